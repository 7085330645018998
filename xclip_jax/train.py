"""The train loop: mesh, data, state, step; log, evaluate, checkpoint. Nothing model-specific.

The method (CLIP, DeCLIP, ...) enters only through the registry (`xclip_jax.methods`),
so every method shares this loop, its sharding, its checkpoints and its preemption handling.
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from absl import logging

from xclip_jax import assembly
from xclip_jax import checkpoint as ckpt_lib
from xclip_jax import ema as ema_lib
from xclip_jax import finetune
from xclip_jax import metrics as metrics_lib
from xclip_jax import nonfinite as nonfinite_lib
from xclip_jax import profiling
from xclip_jax import resume
from xclip_jax import tracking
from xclip_jax.data import global_batches
from xclip_jax.data import sources
from xclip_jax.evaluate import runner as eval_runner
from xclip_jax.parallel import multihost


def _check_writable(workdir: str) -> None:
  """Creates `workdir` and writes a probe file, so a bad path fails now, not at the first save."""
  from etils import epath  # Orbax's path library: local paths and gs:// alike
  try:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe_{os.getpid()}_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise OSError(f"The workdir {workdir} cannot be written ({e.strerror or e}): pass a writable "
                  "--workdir (checkpoints, events and eval results go there).") from e


def _counter_totals(batches: global_batches.GlobalBatchIterator,
                    base: dict[str, int] | None = None) -> dict[str, int]:
  """Bad-record counters of the input pipeline, summed over processes, plus `base` (the totals
  saved with the checkpoint this run resumed from): undecodable_image, duplicated,
  caption_truncated, records, ... (train_pipeline.py). A collective: every process calls it at the
  same steps (log and save steps)."""
  counters = batches.data_counters()
  names = sorted(set(counters) | set(base or {}))
  if not names:
    return {}
  values = np.array([counters.get(k, 0) for k in names], np.int64)
  if jax.process_count() > 1:
    values = np.asarray(multihost_utils.process_allgather(values)).reshape(-1, len(names)).sum(0)
  return {k: int(v) + int((base or {}).get(k, 0)) for k, v in zip(names, values)}


def _data_counters(batches: global_batches.GlobalBatchIterator,
                   base: dict[str, int] | None = None) -> dict[str, float]:
  """The counters as metrics: data/<reason> for dropped records, data/duplicated, ..."""
  return {f"data/{k}": float(v) for k, v in _counter_totals(batches, base).items()}


def run(config: ml_collections.ConfigDict, workdir: str, *,
        resume_with_changes: bool = False) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the last metrics.

  A workdir with checkpoints is resumed only with the config it was saved with, up to the fields
  `resume.MAY_CHANGE` lists (resume.ConfigMismatchError names the others), unless
  `resume_with_changes`. SIGTERM at any point after start-up (even during compilation) saves at a
  step boundary every process agrees on, then raises multihost.Preempted (main.py exits with
  multihost.REQUEUE_EXIT_STATUS).
  """
  with multihost.PreemptionWatch() as preemption, tracking.log_file(workdir), \
      profiling.stopped_on_exit():
    return _run(config, workdir, preemption, resume_with_changes)


def _run(config: ml_collections.ConfigDict, workdir: str, preemption: multihost.PreemptionWatch,
         resume_with_changes: bool) -> dict[str, float]:
  with contextlib.ExitStack() as resources:     # closed in reverse order, whatever happens
    return _train(config, workdir, preemption, resume_with_changes, resources)


def _train(config: ml_collections.ConfigDict, workdir: str, preemption: multihost.PreemptionWatch,
           resume_with_changes: bool, resources: contextlib.ExitStack) -> dict[str, float]:

  # ------------------------------------------------------------------------------------------------
  #  Check everything that can fail cheaply before compiling anything
  # ------------------------------------------------------------------------------------------------
  method, mesh, host_batch = assembly.build_mesh(config)
  finetune.check_not_source(workdir, config.init_from)
  source = sources.make_source(config)
  assembly.check_text_spec(config, source.text_spec)
  _check_writable(workdir)
  finetune.check_not_imported(workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, every=config.checkpoint.every,
                                       keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  resources.callback(checkpointer.close)   # last to close: waits for a save in flight
  start_step = checkpointer.latest_step() or 0
  counters_base, saved = {}, {}
  if start_step:     # a workdir holds one run: refuse a config that defines another
    saved = checkpointer.restore_config(start_step)
    changed = resume.check(saved, config, step=start_step, workdir=workdir,
                           allow_changes=resume_with_changes)
    if changed and jax.process_index() == 0:
      resume.record(workdir, start_step, changed)
    counters_base = checkpointer.restore_counters(start_step)
  logging.info("Mesh %s; global batch %d (%d per process); %d devices.",
               dict(mesh.shape), config.batch_size, host_batch, jax.device_count())

  # ------------------------------------------------------------------------------------------------
  #  Model and optimizer state, created directly in their shardings
  # ------------------------------------------------------------------------------------------------
  parts = assembly.build(config, source.text_spec, mesh=mesh)
  logging.info("Model: %s, %.2fM parameters.", config.method, parts.num_params / 1e6)
  if start_step:
    logging.info("Resuming from the checkpoint at step %d.", start_step)
    parts.state = ema_lib.restore(checkpointer.restore, start_step, parts.state,
                                  ema_lib.decay_of(saved), config)
  elif config.init_from:
    # Fine-tuning: only the parameters come from elsewhere; optimizer, step and rng start afresh.
    parts.with_params(finetune.init_params(config.init_from, parts.state["params"]))
  if start_step >= config.total_steps:
    logging.info("The checkpoint at step %d already reaches config.total_steps=%d: nothing to do.",
                 start_step, config.total_steps)
    return {}

  # ------------------------------------------------------------------------------------------------
  #  Input pipeline: this process's slice -> host batches -> global arrays
  # ------------------------------------------------------------------------------------------------
  batches = global_batches.GlobalBatchIterator(
      source.host_batches(method.views, parts.batch_sharding, host_batch=host_batch,
                          start_step=start_step),
      parts.batch_sharding, prefetch=config.data.prefetch)
  resources.callback(batches.close)
  if source.evaluates:
    evaluators = eval_runner.build_evaluators(config, source.tokenizer, mesh, parts.graphdef)
  else:
    logging.info("Synthetic data: in-loop evaluation is skipped.")
    evaluators = []
  logger = metrics_lib.MetricLogger(
      workdir, total_steps=config.total_steps, global_batch=config.batch_size,
      writer=tracking.make_writer(config, workdir, resume_step=start_step),
      dataset_size=source.dataset_size)
  resources.callback(logger.close)
  profiler = profiling.StepProfiler(config.profile, workdir, first_step=start_step)

  # ------------------------------------------------------------------------------------------------
  #  Compile the step ahead of time (reports compile time; dry_run stops here)
  # ------------------------------------------------------------------------------------------------
  batch = next(batches)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled_step = parts.train_step().lower(parts.state, batch).compile()
  compile_seconds = time.perf_counter() - t0
  logging.info("Train step compiled in %.1f s.", compile_seconds)
  if config.dry_run:
    return {"compile_seconds": compile_seconds}

  # ------------------------------------------------------------------------------------------------
  #  The loop
  # ------------------------------------------------------------------------------------------------
  state, last, step = parts.state, {}, start_step
  nonfinite = nonfinite_lib.NonFiniteSteps(
      config.optim.max_nonfinite_steps,
      describe_checkpoints=lambda: (f", and the checkpoints under {workdir} are intact (latest: "
                                    f"{checkpointer.latest_step()})"))
  logger.start(step)
  while step < config.total_steps:
    profiler.step_begins(step + 1)
    state, metrics = compiled_step(state, batch)
    step += 1
    is_last = step == config.total_steps
    profiler.step_ended(step, (state, metrics), last=is_last)
    nonfinite.observe(step, metrics, is_last=is_last)   # non-finite steps were skipped in the step

    if step % config.log_every == 0 or is_last or step == start_step + 1:
      last = {k: float(v) for k, v in jax.device_get(metrics).items()}
      last["skipped_total"] = float(nonfinite.total)
      last.update(_data_counters(batches, counters_base))
      last.update(logger.timing(step))
      if step == start_step + 1:
        last["compile_seconds"] = compile_seconds
      logger.write(step, last)

    # Asked every step, in every process (a host-side call: the device pipeline does not wait);
    # the answer is the same everywhere, so all processes save this step together or none does.
    preempted = preemption.reached(step) and not is_last

    if evaluators and not preempted and (
        (config.eval_every and step % config.eval_every == 0) or is_last):
      results = eval_runner.run_evaluators(evaluators, state)
      logger.write(step, results)
      last.update(results)

    # Saves on the interval, at the end, and at the agreed preemption step.
    if is_last or preempted or checkpointer.due(step):
      checkpointer.save(step, state, config, counters=_counter_totals(batches, counters_base),
                        force=True, preempted=preempted)
    if preempted:
      resources.close()             # the checkpointer waits until the save is complete everywhere
      logging.warning("Saved step %d after a preemption notice; the same command resumes it.",
                      step)
      raise multihost.Preempted(step, workdir)
    if not is_last:
      batch = next(batches)
  return last
