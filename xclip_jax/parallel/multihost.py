"""Multi-controller start-up: one Python process per host, all running the same program.

`jax.distributed.initialize()` finds the coordinator by itself on Cloud TPU pods and under SLURM;
elsewhere (a GPU cluster without SLURM, or several processes on one machine) the coordinator
address, the process count and this process's id are passed explicitly (main.py's flags). On CPU
the cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def detected_cluster() -> str | None:
  """The cluster environment jax.distributed can configure itself from, if any."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu_pod"
  return None


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               mode: str = "auto") -> bool:
  """Starts the distributed runtime when asked or detected; returns whether it did.

  mode: "auto" (explicit flags, SLURM or a TPU pod -> initialise; otherwise one process),
        "on" (always; let JAX detect what it can), "off" (never).
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed={mode!r}: use auto, on or off.")
  explicit = bool(coordinator_address)
  if mode == "off" or (mode == "auto" and not explicit and detected_cluster() is None):
    return False
  if explicit and (num_processes <= 0 or process_id < 0):
    raise ValueError("--coordinator_address needs --num_processes and --process_id too.")
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_plugin():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("Distributed runtime: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def _has_accelerator_plugin() -> bool:
  """Whether a GPU or TPU jax plugin is installed (checked without initialising a backend)."""
  import importlib.util
  return any(importlib.util.find_spec(name) is not None
             for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))
