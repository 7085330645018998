"""Multi-controller start-up, and the step at which every process stops for a preemption.

`jax.distributed.initialize()` finds the coordinator by itself on Cloud TPU pods and under SLURM;
elsewhere (a GPU cluster without SLURM, or several processes on one machine) the coordinator
address, the process count and this process's id are passed explicitly (main.py's flags). On CPU
the cross-process collectives use gloo.

Preemption. The hosts of a pod are never told at the same step, and a process that starts
Orbax's collective save while another runs the next step's collectives hangs both. So no process
decides alone: with the distributed runtime, JAX's preemption service does it. Its notifier
catches SIGTERM in C++ (nothing here installs a Python handler over it), tells the coordination
service, and every process agrees to stop at the call after the furthest one any process had
made: `multihost_utils.reached_preemption_sync_point`, asked once per step (`PreemptionWatch`).
A single process without the runtime (a notebook, a test, `python -m xclip_jax.main` on one host)
uses a Python SIGTERM handler instead: one process agrees with itself.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

# Exit status of a run that saved a checkpoint after a preemption notice and can be resumed by
# running the same command: EX_TEMPFAIL of sysexits.h ("temporary failure; try again"). A run
# that finished exits 0; anything else is an error. launch/* requeue on this status.
REQUEUE_EXIT_STATUS = 75


class Preempted(Exception):
  """The run stopped for a preemption notice; every process saved the checkpoint of `step`."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"Preempted: saved the checkpoint of step {step} under {workdir}; run the "
                     f"same command to resume (exit status {REQUEUE_EXIT_STATUS}).")
    self.step = step
    self.workdir = workdir


def detected_cluster() -> str | None:
  """The cluster environment jax.distributed can configure itself from, if any."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu_pod"
  return None


# ---- SIGTERM before the runtime exists, and without it -------------------------------------------

_sigterm = threading.Event()


def _on_sigterm(signum, frame):
  del signum, frame
  logging.warning("SIGTERM received: will save a checkpoint at the next step boundary.")
  _sigterm.set()


def catch_early_sigterm() -> None:
  """Remembers a SIGTERM that arrives before `initialize` (imports, flag parsing), which would
  otherwise kill the process: `initialize` hands it on to JAX's notifier, or the single-process
  watch acts on it. main() calls this first."""
  signal.signal(signal.SIGTERM, _on_sigterm)


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
  jax.distributed.initialize(**kwargs)     # installs JAX's SIGTERM notifier (C++)
  logging.info("Distributed runtime: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  if _sigterm.is_set() and _agreement_available():
    # Caught by catch_early_sigterm before the notifier existed: deliver it to the notifier now.
    _sigterm.clear()
    os.kill(os.getpid(), signal.SIGTERM)
  return True


def _has_accelerator_plugin() -> bool:
  """Whether a GPU or TPU jax plugin is installed (checked without initialising a backend)."""
  import importlib.util
  return any(importlib.util.find_spec(name) is not None
             for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def _agreement_available() -> bool:
  """Whether JAX's preemption service runs (it needs the distributed runtime)."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


# ---- the agreed step -----------------------------------------------------------------------------

# JAX's service keeps one call counter per process and agrees on a value of it, so every process
# must make the same sequence of calls: the loop's k-th step since start-up is call k (all
# processes start from the same checkpoint). A notice before the first call (during compilation,
# say) agrees on call 1: the first step. Kept per process, not per run, so that a second run in
# the same process continues the sequence instead of moving the counter backwards.
_calls = 0


class PreemptionWatch:
  """`reached(step)`, asked once per step: stop and save here? The same answer in every process.

  Use as a context manager around the run: without the distributed runtime it installs the
  SIGTERM handler (and removes it on exit); with it, SIGTERM stays JAX's.
  """

  def __init__(self):
    self.agreed = _agreement_available()
    self._previous = None
    if jax.process_count() > 1 and not self.agreed:
      logging.warning("JAX's preemption service is off (jax_enable_preemption_service=False): "
                      "SIGTERM is not handled, as processes could not agree on a step to save.")

  def __enter__(self):
    if not self.agreed:
      # One process: our handler. Several without agreement: SIGTERM kills, as it would without
      # us (a handler that let one process stop alone would hang the others).
      alone = jax.process_count() == 1
      self._previous = signal.signal(signal.SIGTERM, _on_sigterm if alone else signal.SIG_DFL)
    return self

  def __exit__(self, *exc):
    _sigterm.clear()            # acted on (or the run ended): a later run starts afresh
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, step: int) -> bool:
    """Whether this step (just dispatched) is the one every process saves and stops at."""
    global _calls
    if not self.agreed:
      return _sigterm.is_set() and jax.process_count() == 1
    _calls += 1
    if multihost_utils.reached_preemption_sync_point(_calls):
      logging.warning("Preemption notice: every process stops at step %d (agreed sync point).",
                      step)
      return True
    return False
