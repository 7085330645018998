"""Entry point: python -m xclip_jax.main --config=configs/clip.py:demo [--workdir=DIR] [--config.k=v]

Overrides are type-checked by ml_collections against the config file's fields: an unknown key or a
value of the wrong type is an error here, before any data is read or anything compiles.
"""

from __future__ import annotations

import datetime
import logging as logging_std
import os
import sys

# TensorFlow (data pipeline only) must not take accelerator memory or flood the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/clip.py:demo.",
    lock_config=True)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process runtime: auto starts it with the flags below, under SLURM or on a TPU pod.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 (multi-process runs outside SLURM/TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, TensorBoard events). Default: "
    "./workdirs/<method>_<variant>, or ./workdirs/finetune_<source> with config.init_from; a "
    "workdir with checkpoints is resumed if its saved config matches (see --resume_with_changes).")
_RESUME_WITH_CHANGES = flags.DEFINE_bool(
    "resume_with_changes", False, "Resume the workdir's run even though the config differs from "
    "its saved one in fields that define the run (lr, data, model, ...); the changes are logged "
    "and recorded in <workdir>/resume_changes.jsonl. Without it such a resume is refused.")


def default_workdir(config) -> str:
  if config.init_from:      # fine-tuning: never the source run itself
    from xclip_jax import finetune
    return finetune.default_workdir(config.init_from)
  name = f"{config.method}_{config.variant}" if config.variant else config.method
  return os.path.join("workdirs", name)


class _QuietLibraries(logging_std.Filter):
  """Drops INFO records of chatty libraries (Orbax logs every save phase); warnings pass."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/clip.py:demo")
  from xclip_jax.parallel import multihost  # after flag parsing: keeps `--help` fast
  multihost.catch_early_sigterm()           # a SIGTERM from here on is saved for, not fatal
  from xclip_jax import train

  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                       _DISTRIBUTED.value)

  workdir = _WORKDIR.value or default_workdir(config)
  logging.info("Workdir %s (started %s).", os.path.abspath(workdir),
               datetime.datetime.now().isoformat(timespec="seconds"))
  try:
    train.run(config, workdir, resume_with_changes=_RESUME_WITH_CHANGES.value)
  except multihost.Preempted as e:
    # Every process saved the same step: "resumable, requeue me" for the launcher (docs/launch.md).
    logging.warning("%s", e)
    sys.exit(multihost.REQUEUE_EXIT_STATUS)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
