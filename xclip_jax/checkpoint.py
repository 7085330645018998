"""Checkpoints through Orbax's CheckpointManager, and `load_params` for notebooks.

Layout under the workdir:
  checkpoints/<step>/state          the train state as a pure pytree (step, params, opt_state, ...,
                                    ema_params with config.ema_decay > 0)
  checkpoints/<step>/config         the run's config as JSON
  checkpoints/<step>/data_counters  the input pipeline's counters up to <step>, summed over
                                    processes (JSON; data/* metrics continue from them on resume)
Orbax writes each step into a temporary directory and renames it when complete, so a crash during
an (asynchronous) save never leaves a step that `latest_step()` would pick up half-written.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from xclip_jax.ema import KEY as EMA_PARAMS   # the state's moving average of the parameters

STATE, CONFIG, COUNTERS = "state", "config", "data_counters"
ITEMS = (STATE, CONFIG, COUNTERS)


def checkpoint_dir(workdir: str) -> str:
  """<workdir>/checkpoints; workdirs may be local paths or URLs such as gs://bucket/run."""
  workdir = str(workdir)
  if "://" in workdir:
    return workdir.rstrip("/") + "/checkpoints"
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions, ...); earlier ones are intact."""


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, told the loop's preemption decision instead of asking JAX itself.

  Orbax's own `reached_preemption(step)` calls JAX's preemption sync point with the checkpoint's
  step, in `save()` and in its asynchronous finalize thread. JAX keeps one call counter per
  process, so those calls would move it (even backwards, from the finalize thread) under the
  loop's agreement (parallel/multihost.PreemptionWatch asks once per step). Orbax only logs and
  records metrics with the answer.
  """

  preempted_step: int | None = None

  def reached_preemption(self, step: int) -> bool:
    return step == self.preempted_step


class Checkpointer:
  """A thin wrapper that fixes the item names and the save policy of one run."""

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    # The interval is applied here, not by Orbax (which also saves the first step it sees).
    self._every = int(every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self._directory = checkpoint_dir(workdir)
    self._manager = _Manager(self._directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `step` is on the save interval."""
    return self._every > 0 and step % self._every == 0

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict, *,
           counters: dict[str, int] | None = None, force: bool = False,
           preempted: bool = False) -> bool:
    """Saves if `step` is a multiple of `every` (or `force`); returns whether a save started.

    `counters`: the data counters up to `step`, summed over processes (the same in each).
    `preempted`: this is the save every process agreed on after a preemption notice.
    """
    if not force and not self.due(step):
      return False
    if preempted:
      self._manager.preempted_step = step
    with self._explained(f"step {step}"):
      return self._manager.save(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardSave(state),
          CONFIG: ocp.args.JsonSave(config.to_dict()),
          COUNTERS: ocp.args.JsonSave({k: int(v) for k, v in (counters or {}).items()})}),
          force=True)

  def _explained(self, what: str):
    """Turns any failure of Orbax's (possibly asynchronous) writing into one clear error."""
    import contextlib

    @contextlib.contextmanager
    def context():
      try:
        yield
      except Exception as e:  # noqa: BLE001  (Orbax raises many types; re-raised below)
        steps = self._manager.all_steps(read=True)
        raise CheckpointWriteError(
            f"Writing a checkpoint ({what}) under {self._directory} failed: {e!r}. Unfinished "
            f"checkpoints are never promoted; the complete ones are intact "
            f"({sorted(steps) or 'none'}). Free space or fix the workdir, then run the same "
            "command again to resume from the latest complete checkpoint.") from e
    return context()

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` into the shapes, dtypes and shardings of `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE]

  def restore_config(self, step: int) -> dict:
    """The config saved with `step`, as JSON (lists where the config had tuples)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        CONFIG: ocp.args.JsonRestore()}))
    return dict(restored[CONFIG])

  def restore_counters(self, step: int) -> dict[str, int]:
    """The data counters saved with `step` ({} for checkpoints written before they were)."""
    from etils import epath  # Orbax's path library: local paths and gs:// alike
    if not (epath.Path(self._directory) / str(step) / COUNTERS).exists():
      return {}
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        COUNTERS: ocp.args.JsonRestore()}))
    return {k: int(v) for k, v in dict(restored[COUNTERS]).items()}

  def wait(self) -> None:
    with self._explained("finishing an asynchronous save"):
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._explained("finishing an asynchronous save"):
      self._manager.wait_until_finished()
    self._manager.close()


def _resolve_step(manager: ocp.CheckpointManager, workdir: str, step: int | None) -> int:
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"No checkpoint under {checkpoint_dir(workdir)}.")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"No checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                            f"available: {sorted(steps)}.")
  return step


def _read_subtrees(workdir: str, step: int | None, make_target, make_restore_arg
                   ) -> tuple[int, dict]:
  """(step, the subtrees `make_target(stored tree)` names of a checkpoint's state), read alone."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = _resolve_step(manager, workdir, step)
  path = f"{checkpoint_dir(workdir)}/{step}/{STATE}"
  checkpointer = ocp.PyTreeCheckpointer()
  target = make_target(checkpointer.metadata(path).item_metadata.tree)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=jax.tree.map(make_restore_arg, target), partial_restore=True))
  return step, restored


def _stored_params_key(stored: dict, workdir: str, ema: bool) -> str:
  """The state subtree that holds the parameters asked for: `params`, or its EMA."""
  if not ema:
    return "params"
  if EMA_PARAMS not in stored:
    raise ValueError(f"The checkpoint under {checkpoint_dir(workdir)} holds no moving average of "
                     "the parameters (its run had config.ema_decay=0): load the parameters "
                     "themselves (ema=False), or train with --config.ema_decay=0.9999.")
  return EMA_PARAMS


def load_params(workdir: str, step: int | None = None, *, ema: bool = False) -> dict[str, Any]:
  """The model parameters of a checkpoint as nested dicts of numpy arrays. No mesh needed.

  Reads only the `params` subtree (optimizer moments are skipped), onto the host; ema=True reads
  the parameters' moving average instead (runs with config.ema_decay > 0).
  """
  key = EMA_PARAMS if ema else "params"
  _, restored = _read_subtrees(
      workdir, step, lambda tree: {key: tree[_stored_params_key(tree, workdir, ema)]},
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray))
  return restored[key]


def param_shapes(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, the stored `params` tree with each leaf's shape as a tuple), from metadata alone."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = _resolve_step(manager, workdir, step)
  tree = ocp.PyTreeCheckpointer().metadata(
      f"{checkpoint_dir(workdir)}/{step}/{STATE}").item_metadata.tree
  return step, jax.tree.map(lambda m: tuple(m.shape), tree["params"])


def restore_model(workdir: str, step: int | None, abstract: dict[str, Any], *,
                  ema: bool = False) -> tuple[int, dict]:
  """(step, {"params": ..., "model_state": ...}) restored into the shapes and shardings of
  `abstract` (ShapeDtypeStructs with shardings, e.g. from mesh.abstract_model); the optimizer
  state is not read, nor a subtree `abstract` lacks (init_from reads the params alone). The mesh
  may differ from the one the run trained on.

  ema=True fills "params" from the parameters' moving average; an "ema_params" entry in
  `abstract` reads that average as well (both: ValueError if the run kept none)."""
  sources = {}           # abstract's key -> the stored subtree it is read from

  def target(stored):
    sources.update({k: "model_state" if k == "model_state" else
                    _stored_params_key(stored, workdir, ema or k == EMA_PARAMS)
                    for k in ("params", "model_state", EMA_PARAMS) if k in abstract})
    return {source: abstract[k] for k, source in sources.items() if source in stored}
  step, stored = _read_subtrees(
      workdir, step, target,
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype))
  restored = {k: stored[source] for k, source in sources.items() if source in stored}
  restored.setdefault("model_state", {})
  return step, restored


def load_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a checkpoint was trained with, as saved (see `saved_config` for the full schema)."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = _resolve_step(manager, workdir, step)
  restored = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  return ml_collections.ConfigDict(restored[CONFIG])


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The checkpoint's config merged onto today's `base_config()`: fields added since the run
  was saved keep their defaults, so every current field can be read and overridden."""
  from xclip_jax import config as config_lib  # noqa: PLC0415  (config imports nothing from here)
  config = config_lib.base_config()
  config_lib.merge_saved(config, load_config(workdir, step).to_dict())
  return config
