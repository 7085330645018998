"""Reliability: exact resume after SIGTERM; SIGKILL during asynchronous saves, then SIGTERM (exit
75) and the same command resuming, as real processes; clear errors for a workdir that cannot be
written or a full disk."""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from xclip_jax import checkpoint, metrics, train
from xclip_jax.parallel import multihost

from tests.tiny import ROOT, checkpoint_steps, main_command, tiny_config


def _sigterm_at(monkeypatch, stop_step):
  """Sends this process a real SIGTERM right after step `stop_step` is logged."""
  original = metrics.MetricLogger.write

  def write(self, step, scalars, **kwargs):
    original(self, step, scalars, **kwargs)
    if step == stop_step and "loss" in scalars:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics.MetricLogger, "write", write)


@pytest.mark.slow
def test_sigterm_and_resume_is_bitwise_equal_to_an_uninterrupted_run(demo_dir, tmp_path,
                                                                     monkeypatch):
  config = lambda: tiny_config(demo_dir, total_steps=7, **{"evals.zeroshot.enabled": False,
                                                           "checkpoint.every": 100})
  reference = str(tmp_path / "reference")
  train.run(config(), reference)
  expected = checkpoint.load_params(reference)

  # One workdir preempted twice, early and late, the second time in a resumed run; after each
  # notice the same config resumes.
  interrupted = str(tmp_path / "interrupted")
  for stop_step, saved in ((2, [2]), (5, [2, 5])):
    with monkeypatch.context() as m:
      _sigterm_at(m, stop_step)
      with pytest.raises(multihost.Preempted) as preempted:   # main.py exits 75 on it
        train.run(config(), interrupted)
    assert preempted.value.step == stop_step
    assert checkpoint_steps(interrupted) == saved
  train.run(config(), interrupted)
  assert checkpoint_steps(interrupted) == [2, 5, 7]
  got = checkpoint.load_params(interrupted)
  for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)


def _start(cmd, log):
  with open(log, "w") as f:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def _wait_for_steps(proc, log, count):
  """Until `log` (freshly written by `proc`) holds `count` step lines; a deadline fails the test."""
  deadline = time.time() + 600
  while log.read_text().count("] step ") < count:
    assert proc.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline, "no training step logged in time"
    time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_during_saves_then_sigterm_exit_75_and_the_same_command_resumes(demo_dir,
                                                                                 tmp_path):
  """One workdir through what a preemptible job meets, as real `xclip_jax.main` processes:
  SIGKILL while asynchronous saves run every step; the same command resumes the newest complete
  checkpoint; SIGTERM there saves and exits 75 (requeue); the same command, two steps further,
  resumes that save and finishes."""
  workdir = tmp_path / "run"
  cmd = main_command(workdir, demo_dir, 100_000)
  log = tmp_path / "log.txt"
  proc = _start(cmd + ["--config.checkpoint.every=1", "--config.checkpoint.keep=3"], log)
  _wait_for_steps(proc, log, 8)            # steps logged before the kill; saves run every step
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  # Every step the manager reports restores; half-written ones are not reported.
  manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir),
                                  item_names=("state", "config"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  killed = manager.all_steps()
  assert killed, "no complete checkpoint"
  for step in killed:
    params = checkpoint.load_params(str(workdir), step=step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  newest = max(killed)

  # The same command (interval saves off, which a resume may change) resumes the newest
  # complete checkpoint; SIGTERM 3 steps on saves once more and exits 75:
  # parallel/multihost.REQUEUE_EXIT_STATUS, saved after a preemption notice, resumable.
  proc = _start(cmd, log)
  _wait_for_steps(proc, log, 3)
  assert f"Resuming from the checkpoint at step {newest}" in log.read_text()
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=600) == 75, log.read_text()[-3000:]
  assert "after a preemption notice" in log.read_text()
  steps = checkpoint_steps(workdir)
  (saved,) = set(steps) - set(killed)                       # only the forced save is new
  assert saved == max(steps) and saved >= newest + 3

  out = subprocess.run(main_command(workdir, demo_dir, saved + 2), cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Resuming from the checkpoint at step {saved}" in out.stderr
  assert f"step {saved + 1}/{saved + 2}" in out.stderr
  assert checkpoint_steps(workdir)[-2:] == [saved, saved + 2]


def test_unwritable_workdir_is_a_clear_error_before_compiling(demo_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(OSError, match="cannot be written"):
    train.run(tiny_config(demo_dir), str(blocker / "run"))


def _limit_file_size(limit_bytes):
  """preexec_fn: writes past `limit_bytes` fail with EFBIG (as on a full disk), not SIGXFSZ."""
  def apply():
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
  return apply


@pytest.mark.slow
def test_a_full_disk_is_a_clear_error_and_promotes_no_checkpoint(demo_dir, tmp_path):
  workdir = tmp_path / "run"
  cmd = main_command(workdir, demo_dir, 4) + ["--config.checkpoint.every=2"]
  # Large enough for the tokenizer, logs and events; too small for any checkpoint's arrays.
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       preexec_fn=_limit_file_size(16 * 1024))
  assert out.returncode != 0
  assert "Writing a checkpoint" in out.stderr and "failed" in out.stderr, out.stderr[-3000:]
  manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir),
                                  item_names=("state", "config"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  assert manager.all_steps() == []
  # With space again, the same command trains from scratch and saves.
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert checkpoint_steps(workdir) == [2, 4]
