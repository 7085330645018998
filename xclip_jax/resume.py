"""Which config changes a resumed run accepts, and the refusal of the others.

A workdir holds one run. Starting a command in a workdir that has checkpoints resumes that run, so
the new config must be the saved one, apart from fields that do not change what is computed:

  run length and cadence   total_steps, log_every, eval_every, dry_run, checkpoint.*
  tracking and profiling   wandb.*, profile.*
  evaluation               evals.*  (what is measured, not what is trained)
  host-side throughput     data.prefetch, data.num_parallel_calls (tf.data stays deterministic)
  memory and layout        mesh.*, model.remat, accum_steps, contrastive.impl/chunk, and every
                           method option (methods.base.Option, e.g. siglip.impl): the same model
                           and gradients computed another way (results equal up to float
                           rounding, as after resuming on another slice)

total_steps also ends the learning-rate schedule: extending a run stretches its cosine decay from
the resumed step on (logged). Any other difference (lr, seed, data, model, method, ...) is a
different experiment: the run refuses and names each differing key, unless the user passes
--resume_with_changes; then the changes are logged and appended to <workdir>/resume_changes.jsonl.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
from typing import Any

import ml_collections
from absl import logging

from xclip_jax import methods

# Fields a resumed run may change freely ('*' matches any key below a section); the methods'
# options (methods.option_paths()) too.
MAY_CHANGE = (
    "total_steps", "log_every", "eval_every", "dry_run", "checkpoint.*", "evals.*",
    "data.prefetch", "data.num_parallel_calls",
    "mesh.*", "model.remat", "accum_steps", "contrastive.impl", "contrastive.chunk",
    "wandb.*", "profile.*",
)
CHANGES_FILE = "resume_changes.jsonl"


class ConfigMismatchError(ValueError):
  """The workdir holds a run whose saved config differs in what defines it."""


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _as_json(config: ml_collections.ConfigDict) -> dict:
  """The config as the checkpoint stores it (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict()))


def may_change(key: str) -> bool:
  return (any(fnmatch.fnmatchcase(key, pattern) for pattern in MAY_CHANGE)
          or key in methods.option_paths())


def differences(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """{key: (saved value, new value)} of the fields that define the run and differ.

  Fields the saved config lacks (added to the schema since it was written) are not compared:
  their value in the old run is unknown; they are logged.
  """
  old, new = _flat(saved), _flat(_as_json(config))
  unknown = sorted(k for k in new if k not in old and not may_change(k))
  if unknown:
    logging.info("Resume: %d fields are not in the saved config (added since) and are not "
                 "compared: %s", len(unknown), unknown[:10])
  return {k: (old[k], v) for k, v in new.items()
          if k in old and old[k] != v and not may_change(k)}


def check(saved: dict, config: ml_collections.ConfigDict, *, step: int, workdir: str,
          allow_changes: bool) -> dict[str, tuple[Any, Any]]:
  """Refuses to resume the run saved in `workdir` at `step` with a config that differs in what
  defines the run (ConfigMismatchError naming every differing key), unless `allow_changes`.
  Returns the differences that were accepted."""
  if saved.get("total_steps") != config.total_steps:
    logging.info("Resume: total_steps %s -> %d; the learning-rate schedule now ends at step %d.",
                 saved.get("total_steps"), config.total_steps, config.total_steps)
  changed = differences(saved, config)
  if not changed:
    return {}
  lines = "\n".join(f"  {k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
  if not allow_changes:
    raise ConfigMismatchError(
        f"{workdir} holds a run (checkpoint at step {step}) whose config differs from this one in "
        f"{len(changed)} field(s) that define the run:\n{lines}\n"
        "Start the new experiment in its own --workdir, or pass --resume_with_changes to resume "
        "this run with the new values (the change is recorded in "
        f"{workdir}/{CHANGES_FILE}). Run length, logging, evaluation and checkpoint cadence may "
        "change freely (xclip_jax/resume.py: MAY_CHANGE).")
  logging.warning("Resuming the run at step %d with %d changed field(s) "
                  "(--resume_with_changes):\n%s", step, len(changed), lines)
  return changed


def record(workdir: str, step: int, changed: dict[str, tuple[Any, Any]]) -> None:
  """Appends one JSON line {time, step, changes} to <workdir>/resume_changes.jsonl."""
  from etils import epath  # Orbax's path library: local paths and gs:// alike
  path = epath.Path(workdir) / CHANGES_FILE
  line = json.dumps({"time": datetime.datetime.now().isoformat(timespec="seconds"),
                     "step": step,
                     "changes": {k: {"saved": old, "now": new}
                                 for k, (old, new) in changed.items()}})
  previous = path.read_text() if path.exists() else ""
  path.write_text(previous + line + "\n")      # epath has no append mode (gs:// objects)
