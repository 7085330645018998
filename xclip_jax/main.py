"""Entry point: python -m xclip_jax.main --config=configs/clip.py:demo [--workdir=DIR] [--config.k=v]

Overrides are type-checked by ml_collections against the config file's fields: an unknown key or a
value of the wrong type is an error here, before any data is read or anything compiles.
"""

from __future__ import annotations

import datetime
import logging as logging_std
import os

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
    "./workdirs/<method>_<variant>; an existing workdir is resumed.")


def default_workdir(config) -> str:
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
  from xclip_jax import train  # after flag parsing: keeps `--help` fast
  from xclip_jax.parallel import multihost

  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                       _DISTRIBUTED.value)

  workdir = _WORKDIR.value or default_workdir(config)
  logging.info("Workdir %s (started %s).", os.path.abspath(workdir),
               datetime.datetime.now().isoformat(timespec="seconds"))
  train.run(config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
