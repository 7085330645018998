"""The train loop: mesh, data, state, step; log, evaluate, checkpoint. Nothing model-specific.

The method (CLIP, DeCLIP, ...) enters only through `objectives.registry` and the model factory,
so every method shares this loop, its sharding, its checkpoints and its preemption handling.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from absl import logging

from xclip_jax import checkpoint as ckpt_lib
from xclip_jax import config as config_lib
from xclip_jax import ema as ema_lib
from xclip_jax import finetune
from xclip_jax import metrics as metrics_lib
from xclip_jax import optim
from xclip_jax import resume
from xclip_jax import train_state as ts
from xclip_jax.data import global_batches
from xclip_jax.data import mixture
from xclip_jax.data import pipeline
from xclip_jax.data import synthetic
from xclip_jax.data import tokenizer as tokenizer_lib
from xclip_jax.evaluate import runner as eval_runner
from xclip_jax.models import two_tower
from xclip_jax.objectives import registry
from xclip_jax.parallel import mesh as mesh_lib
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
  caption_truncated, records, ... (pipeline.py). A collective: every process calls it at the
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
  with multihost.PreemptionWatch() as preemption:
    return _run(config, workdir, preemption, resume_with_changes)


def _run(config: ml_collections.ConfigDict, workdir: str, preemption: multihost.PreemptionWatch,
         resume_with_changes: bool) -> dict[str, float]:

  # ------------------------------------------------------------------------------------------------
  #  Check everything that can fail cheaply before compiling anything
  # ------------------------------------------------------------------------------------------------
  config_lib.validate(config)
  method = registry.get_method(config.method)
  mesh = mesh_lib.make_mesh(config.mesh)
  host_batch = mesh_lib.batch_size_per_process(config.batch_size, mesh)
  if config.accum_steps > 1:   # each micro-batch must split over the batch axes too
    mesh_lib.batch_size_per_process(config.batch_size // config.accum_steps, mesh)
  finetune.check_not_source(workdir, config.init_from)
  is_synthetic = config.data.name == synthetic.NAME
  if is_synthetic:
    tokenizer = synthetic.SyntheticTokenizer(config.model.text.vocab_size)
  else:
    pipeline.prepare_dataset(config.data.name, config.data.data_dir or None, config.data.builtin)
    mixture.prepare_sources(config.data)       # config.data.mixture's datasets, if any
    tokenizer = tokenizer_lib.resolve_tokenizer(config)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise ValueError(f"The tokenizer has {tokenizer.vocab_size} ids but config.model.text.vocab_size"
                     f"={config.model.text.vocab_size}; raise the latter.")
  _check_writable(workdir)
  finetune.check_not_imported(workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, every=config.checkpoint.every,
                                       keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  start_step = checkpointer.latest_step() or 0
  counters_base, saved = {}, {}
  if start_step:     # a workdir holds one run: refuse a config that defines another
    saved = checkpointer.restore_config(start_step)
    try:
      changed = resume.check(saved, config, step=start_step,
                             workdir=workdir, allow_changes=resume_with_changes)
    except resume.ConfigMismatchError:
      checkpointer.close()
      raise
    if changed and jax.process_index() == 0:
      resume.record(workdir, start_step, changed)
    counters_base = checkpointer.restore_counters(start_step)
  logging.info("Mesh %s; global batch %d (%d per process); %d devices.",
               dict(mesh.shape), config.batch_size, host_batch, jax.device_count())

  # ------------------------------------------------------------------------------------------------
  #  Model and optimizer state, created directly in their shardings
  # ------------------------------------------------------------------------------------------------
  model_fn = lambda: two_tower.build_model(config, eos_id=tokenizer.eos_id, seed=config.seed)
  graphdef, params, model_state = mesh_lib.create_sharded(model_fn, mesh)
  tx, schedule = optim.make_optimizer(config, params)
  method_state = ts.init_method_state(method, config, mesh, config.seed)
  state = ts.init_train_state(params, model_state, tx, mesh, config.seed, method_state)
  state = ema_lib.add_to_state(state, config)       # config.ema_decay > 0: the parameters' EMA
  state_shardings = ts.shardings_of(state)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info("Model: %s, %.2fM parameters.", config.method, n_params / 1e6)

  if start_step:
    logging.info("Resuming from the checkpoint at step %d.", start_step)
    state = ema_lib.restore(checkpointer.restore, start_step, state, ema_lib.decay_of(saved),
                            config)
  elif config.init_from:
    # Fine-tuning: only the parameters come from elsewhere; optimizer, step and rng start afresh.
    params = finetune.init_params(config.init_from, state["params"])
    state = ts.init_train_state(params, model_state, tx, mesh, config.seed, method_state)
    state = ema_lib.add_to_state(state, config)
  if start_step >= config.total_steps:
    logging.info("The checkpoint at step %d already reaches config.total_steps=%d: nothing to do.",
                 start_step, config.total_steps)
    checkpointer.close()
    return {}

  # ------------------------------------------------------------------------------------------------
  #  Input pipeline: this process's slice -> host batches -> global arrays
  # ------------------------------------------------------------------------------------------------
  batch_sharding = mesh_lib.batch_sharding(mesh)
  if is_synthetic:
    dataset = synthetic.host_batches(config, batch_sharding, start_step=start_step,
                                     views=method.views)
  else:
    dataset = pipeline.make_train_dataset(
        config, tokenizer, views=method.views, process_index=jax.process_index(),
        process_count=jax.process_count(), host_batch_size=host_batch,
        **(dict(start_step=start_step) if config.data.exact_resume
           else dict(seed=config.seed + start_step)))
  batches = global_batches.GlobalBatchIterator(dataset, batch_sharding,
                                               prefetch=config.data.prefetch)

  if is_synthetic:
    logging.info("Synthetic data: in-loop evaluation is skipped.")
    evaluators = []
  else:
    evaluators = eval_runner.build_evaluators(config, tokenizer, mesh, graphdef)
  logger = metrics_lib.MetricLogger(workdir, total_steps=config.total_steps,
                                    global_batch=config.batch_size)

  # ------------------------------------------------------------------------------------------------
  #  Compile the step ahead of time (reports compile time; dry_run stops here)
  # ------------------------------------------------------------------------------------------------
  text_spec = tokenizer_lib.text_spec(tokenizer)
  train_step = ts.jit_train_step(
      ts.make_train_step(graphdef, tx, schedule, method, config, text_spec),
      state_shardings, batch_sharding, mesh)
  batch = next(batches)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled_step = train_step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - t0
  logging.info("Train step compiled in %.1f s.", compile_seconds)
  if config.dry_run:
    batches.close()
    checkpointer.close()
    return {"compile_seconds": compile_seconds}

  # ------------------------------------------------------------------------------------------------
  #  The loop
  # ------------------------------------------------------------------------------------------------
  last = {}
  step = start_step
  skipped_total, skipped_streak = 0, 0
  unread = []          # (step, metrics) whose skip flag the host has not read yet
  logger.start(step)
  while step < config.total_steps:
    state, metrics = compiled_step(state, batch)
    step += 1
    is_last = step == config.total_steps

    # Non-finite steps were skipped inside the step; count them here. The flag read is the
    # previous step's (already finished while this one is queued), so the host never stalls the
    # device pipeline; the last step's flag is read at once.
    unread.append((step, metrics))
    while len(unread) > (0 if is_last else 1):
      flagged_step, flagged = unread.pop(0)
      if int(flagged["skipped"]):
        skipped_total += 1
        skipped_streak += 1
        logging.warning("Step %d: non-finite loss or gradients; update skipped (%d in a row).",
                        flagged_step, skipped_streak)
      else:
        skipped_streak = 0
      limit = config.optim.max_nonfinite_steps
      if limit and skipped_streak >= limit:
        checkpointer.close()
        batches.close()
        logger.close()
        raise FloatingPointError(
            f"{skipped_streak} consecutive steps (up to step {flagged_step}) had a non-finite "
            f"loss or gradients; their updates were skipped, so the parameters are those of "
            f"step {flagged_step - skipped_streak}, and the checkpoints under {workdir} are "
            f"intact (latest: {checkpointer.latest_step()}). Lower config.optim.lr, lengthen "
            f"warmup, try float32, or check the data; config.optim.max_nonfinite_steps={limit} "
            "sets this limit.")

    if step % config.log_every == 0 or is_last or step == start_step + 1:
      last = {k: float(v) for k, v in jax.device_get(metrics).items()}
      last["skipped_total"] = float(skipped_total)
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
      batches.close()
      checkpointer.close()          # waits until the checkpoint is complete in every process
      logger.close()
      logging.warning("Saved step %d after a preemption notice; the same command resumes it.",
                      step)
      raise multihost.Preempted(step, workdir)
    if not is_last:
      batch = next(batches)

  batches.close()
  checkpointer.close()
  logger.close()
  return last
