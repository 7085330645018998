"""Bookkeeping of steps whose loss or gradients were not finite (the step itself skipped their
update): counted, logged, and a run stopped after too many in a row.

The host reads each step's flag one step late (that step has finished while the next is queued),
so it never stalls the device pipeline; the last step's flag is read at once.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging


class NonFiniteSteps:

  def __init__(self, limit: int, *, describe_checkpoints: Callable[[], str] = lambda: ""):
    self.limit = limit                  # consecutive skipped steps that stop the run (0: never)
    self.total = 0
    self.streak = 0
    self._unread: list[tuple[int, Any]] = []
    self._describe_checkpoints = describe_checkpoints

  def observe(self, step: int, metrics: dict[str, Any], *, is_last: bool = False) -> None:
    """Queues `step`'s flag and reads those now finished; raises FloatingPointError at the
    limit."""
    self._unread.append((step, metrics))
    while len(self._unread) > (0 if is_last else 1):
      flagged_step, flagged = self._unread.pop(0)
      self._read(flagged_step, bool(int(flagged["skipped"])))

  def _read(self, step: int, skipped: bool) -> None:
    if not skipped:
      self.streak = 0
      return
    self.total += 1
    self.streak += 1
    logging.warning("Step %d: non-finite loss or gradients; update skipped (%d in a row).",
                    step, self.streak)
    if self.limit and self.streak >= self.limit:
      raise FloatingPointError(
          f"{self.streak} consecutive steps (up to step {step}) had a non-finite loss or "
          f"gradients; their updates were skipped, so the parameters are those of step "
          f"{step - self.streak}{self._describe_checkpoints()}. Lower config.optim.lr, lengthen "
          "warmup, try float32, or check the data; config.optim.max_nonfinite_steps="
          f"{self.limit} sets this limit.")
