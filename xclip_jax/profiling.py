"""A jax.profiler trace of a window of train steps (config.profile), into <workdir>/profile.

`config.profile.num_steps=n` (0: off) traces steps start_step ... start_step + n - 1, numbered as
the log numbers them ("step N" ends with the state after N updates). The trace starts just before
the first of them is dispatched and stops once the last one's outputs are ready, so the window
holds those steps' device work (and the host work between them: logging, the next batch).
Each process writes <workdir>/profile/plugins/profile/<run>/<host>.xplane.pb, which TensorBoard's
profile plugin (tensorboard --logdir=<workdir>, or xprof) reads; `config.profile.perfetto=True`
also writes perfetto_trace.json.gz beside it for ui.perfetto.dev.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax
import ml_collections
from absl import logging

PROFILE_DIR = "profile"

_active: list["StepProfiler"] = []    # the profiler with a trace running (at most one)


def profile_dir(workdir: str) -> str:
  return f"{workdir.rstrip('/')}/{PROFILE_DIR}"


class StepProfiler:
  """Starts and stops the trace around the configured window of steps."""

  def __init__(self, profile: ml_collections.ConfigDict, workdir: str, *, first_step: int):
    """`first_step`: the step the run starts from (a resumed checkpoint's, or 0)."""
    self.first = int(profile.start_step)
    self.last = self.first + int(profile.num_steps) - 1
    self.enabled = int(profile.num_steps) > 0
    self._perfetto = bool(profile.perfetto)
    self._dir = profile_dir(workdir)
    self._tracing = False
    if self.enabled and first_step >= self.first:
      logging.info("Profiling: the run starts after step %d, past config.profile.start_step=%d; "
                   "no trace.", first_step, self.first)
      self.enabled = False

  def step_begins(self, step: int) -> None:
    """Call before dispatching the step numbered `step` (1 + the steps done so far)."""
    if self.enabled and step == self.first and not self._tracing:
      jax.profiler.start_trace(self._dir, create_perfetto_trace=self._perfetto)
      self._tracing = True
      _active.append(self)
      logging.info("Profiling steps %d-%d into %s.", self.first, self.last, self._dir)

  def step_ended(self, step: int, outputs: Any, *, last: bool = False) -> None:
    """Call after the step numbered `step` was dispatched; `outputs` are its results (waited on
    before the trace stops). `last`: the run ends here (stops a window cut short)."""
    if self._tracing and (step >= self.last or last):
      jax.block_until_ready(outputs)
      self.stop()
      logging.info("Profile of steps %d-%d written to %s.", self.first, step, self._dir)

  def stop(self) -> None:
    if self._tracing:
      self._tracing = False
      self.enabled = False
      _active.remove(self)
      jax.profiler.stop_trace()


@contextlib.contextmanager
def stopped_on_exit() -> Iterator[None]:
  """Stops a trace left running when the run leaves early (an error, a preemption), so that
  the process can trace again and what was captured is written."""
  try:
    yield
  finally:
    for profiler in list(_active):
      profiler.stop()


def check_config(c: ml_collections.ConfigDict) -> None:
  p = c.profile
  if p.num_steps < 0:
    raise ValueError(f"config.profile.num_steps={p.num_steps} must be >= 0 (0: no profile).")
  if p.num_steps and p.start_step < 1:
    raise ValueError(f"config.profile.start_step={p.start_step} must be >= 1 (step 1 is the "
                     "first train step).")
  if p.num_steps and p.start_step + p.num_steps - 1 > c.total_steps:
    raise ValueError(
        f"config.profile traces steps {p.start_step}-{p.start_step + p.num_steps - 1}, past "
        f"config.total_steps={c.total_steps}: lower config.profile.start_step or num_steps.")
