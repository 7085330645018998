"""Reliability: exact resume after SIGTERM, SIGKILL during asynchronous saves, clear errors for a
workdir that cannot be written."""

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

  for stop_step in (2, 5):                  # early (inside warmup) and late
    interrupted = str(tmp_path / f"stopped_at_{stop_step}")
    with monkeypatch.context() as m:
      _sigterm_at(m, stop_step)
      with pytest.raises(multihost.Preempted) as preempted:   # main.py exits 75 on it
        train.run(config(), interrupted)
    assert preempted.value.step == stop_step
    assert checkpoint_steps(interrupted) == [stop_step]
    train.run(config(), interrupted)
    assert checkpoint_steps(interrupted) == [stop_step, 7]
    got = checkpoint.load_params(interrupted)
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigkill_during_async_saves_leaves_only_complete_checkpoints(demo_dir, tmp_path):
  workdir = tmp_path / "run"
  cmd = main_command(workdir, demo_dir, 100_000) + ["--config.checkpoint.every=1",
                                                     "--config.checkpoint.keep=3"]
  log = tmp_path / "log.txt"
  for kill_after in (8,):                 # steps logged before the kill; saves run every step
    with open(log, "w") as f:
      proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while log.read_text().count("] step ") < kill_after:
      assert proc.poll() is None, log.read_text()[-3000:]
      assert time.time() < deadline
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # Every step the manager reports restores; half-written ones are not reported.
    manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir),
                                    item_names=("state", "config"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    steps = manager.all_steps()
    assert steps, "no complete checkpoint"
    for step in steps:
      params = checkpoint.load_params(str(workdir), step=step)
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  # And the run resumes from the newest complete one.
  newest = max(steps)
  out = subprocess.run(main_command(workdir, demo_dir, newest + 1), cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Resuming from the checkpoint at step {newest}" in out.stderr


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
