"""NonFiniteSteps: skipped steps counted one step late (never stalling the device), streaks reset
by a finite step, and the run stopped with a message at the limit."""

import numpy as np
import pytest

from xclip_jax import nonfinite


def _metrics(skipped):
  return {"skipped": np.int32(skipped)}


def test_flags_are_read_one_step_late_and_at_once_on_the_last_step():
  steps = nonfinite.NonFiniteSteps(limit=0)
  steps.observe(1, _metrics(1))
  assert steps.total == 0                 # step 1's flag is not read while step 2 is queued
  steps.observe(2, _metrics(0))
  assert (steps.total, steps.streak) == (1, 1)
  steps.observe(3, _metrics(1), is_last=True)
  assert (steps.total, steps.streak) == (2, 1)   # step 2 reset the streak; step 3 read at once


def test_the_limit_stops_the_run_with_what_to_do():
  steps = nonfinite.NonFiniteSteps(limit=3, describe_checkpoints=lambda: ", latest: 2")
  for step, flag in enumerate([1, 0, 1, 1], start=1):
    steps.observe(step, _metrics(flag))
  with pytest.raises(FloatingPointError,
                     match=r"3 consecutive steps \(up to step 5\).*those of step 2, latest: 2.*"
                           r"max_nonfinite_steps=3"):
    steps.observe(5, _metrics(1), is_last=True)


def test_no_limit_counts_without_stopping():
  steps = nonfinite.NonFiniteSteps(limit=0)
  for step in range(1, 51):
    steps.observe(step, _metrics(1), is_last=step == 50)
  assert (steps.total, steps.streak) == (50, 50)
