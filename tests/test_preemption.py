"""Preemption drills: two processes on localhost (2 fake CPU devices each, gloo collectives),
SIGTERM as a pod delivers it (to each host at a different step, or to one host only), with
deadlines so that a hang fails the test.

Each drill asserts: both processes exit with multihost.REQUEUE_EXIT_STATUS, both logged the same
saved step, the workdir holds that single checkpoint, its parameters equal an uninterrupted run's
at that step bit for bit, and resuming it with two processes continues bit for bit.

The learning rate is constant after warmup (optim.schedule=constant), so neither a run's trajectory
nor its compiled program depends on total_steps: the drills run "forever" (total_steps 10^5) and
their resumes stop two steps after the saved one, compared with the uninterrupted reference's
checkpoint of that step (and every run loads the step the first one compiled from the session's
compilation cache, tests/conftest.py).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from xclip_jax import checkpoint
from xclip_jax.parallel import multihost

from tests.tiny import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_STEPS = 40      # the reference saves every step up to here; drills stop at 1-10
DEADLINE = 480            # seconds for one two-process run, start-up to exit (a hang fails here)

# One-layer towers and a data-only mesh compile fastest; lr constant after one warmup step.
DRILL = ["--config=configs/clip.py:demo", "--config.data.name=synthetic",
         "--config.batch_size=16", "--config.log_every=1", "--config.model.embed_dim=16",
         "--config.model.image.width=32", "--config.model.image.layers=1",
         "--config.model.image.heads=2", "--config.model.image.patch_size=16",
         "--config.model.text.width=32", "--config.model.text.layers=1",
         "--config.model.text.heads=2", "--config.mesh.data=4", "--config.mesh.fsdp=1",
         "--config.optim.warmup_steps=1", "--config.optim.lr=0.001",
         "--config.optim.schedule=constant", "--config.optim.eps=1e-3"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Processes:
  """`count` processes of xclip_jax.main as one run (2 fake CPU devices each), logging to files."""

  def __init__(self, workdir, tmp_path, name, *flags, count=2):
    port = _free_port()
    env = subprocess_env(2)
    self.paths = [tmp_path / f"{name}.process_{i}.log" for i in range(count)]
    self.procs = []
    for i, path in enumerate(self.paths):
      with open(path, "w") as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "xclip_jax.main", *DRILL, f"--workdir={workdir}", *flags,
             f"--coordinator_address=localhost:{port}", f"--num_processes={count}",
             f"--process_id={i}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    self.started = time.time()

  def log(self, i):
    return self.paths[i].read_text()

  def tails(self):
    return "\n".join(f"--- process {i} ---\n{self.log(i)[-2500:]}" for i in range(len(self.procs)))

  def steps_logged(self):
    """The last step process 0 logged (it alone writes the step lines)."""
    steps = re.findall(r"\] step (\d+)/", self.log(0))
    return int(steps[-1]) if steps else 0

  def running(self):
    return all(p.poll() is None for p in self.procs)

  def wait_until(self, condition, what):
    while not condition():
      if not self.running():
        pytest.fail(f"a process exited before {what}:\n{self.tails()}")
      if time.time() - self.started > DEADLINE:
        self.kill()
        pytest.fail(f"no {what} within {DEADLINE} s:\n{self.tails()}")
      time.sleep(0.02)

  def signal(self, i):
    if self.procs[i].poll() is None:
      self.procs[i].send_signal(signal.SIGTERM)

  def wait(self):
    """Exit statuses; a process still running at the deadline fails the test (a hang)."""
    codes = []
    for p in self.procs:
      try:
        codes.append(p.wait(timeout=max(1.0, DEADLINE - (time.time() - self.started))))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f"hang: still running {DEADLINE} s after start:\n{self.tails()}")
    return codes

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=60)


def _saved_after_preemption(log):
  return [int(s) for s in re.findall(r"Saved step (\d+) after a preemption notice", log)]


def _assert_params_equal(workdir, step, reference):
  got, want = checkpoint.load_params(workdir, step), checkpoint.load_params(reference, step)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted two-process run with a checkpoint at every step."""
  tmp = tmp_path_factory.mktemp("reference")
  run = Processes(tmp / "run", tmp, "reference", f"--config.total_steps={REFERENCE_STEPS}",
                  "--config.checkpoint.every=1", f"--config.checkpoint.keep={REFERENCE_STEPS}")
  assert run.wait() == [0, 0], run.tails()
  return str(tmp / "run")


def _both(k):
  """SIGTERM to process 0 at step >= 3, to process 1 k steps later (by process 0's log)."""
  def deliver(run):
    run.wait_until(lambda: run.steps_logged() >= 3, "step 3")
    first = run.steps_logged()
    run.signal(0)
    if k:
      deadline = time.time() + 60
      while (run.steps_logged() < first + k and run.running() and time.time() < deadline
             and "every process stops" not in run.log(0)):
        time.sleep(0.005)
    run.signal(1)
  return deliver


def _process_1_during_startup(run):
  """SIGTERM to process 1 only, before anything is compiled: all agree on the first step."""
  run.wait_until(lambda: "] Mesh " in run.log(1), "the start of train.run")
  run.signal(1)


DRILLS = {"both_k0": _both(0), "both_k1": _both(1), "both_k3": _both(3),
          "only_process_1_during_startup": _process_1_during_startup}


@pytest.mark.slow
@pytest.mark.parametrize("drill", sorted(DRILLS))
def test_preemption_drill(drill, reference, tmp_path):
  workdir = str(tmp_path / "run")
  run = Processes(workdir, tmp_path, "drill", "--config.total_steps=100000",
                  "--config.checkpoint.every=100000")
  DRILLS[drill](run)
  codes = run.wait()
  assert codes == [multihost.REQUEUE_EXIT_STATUS] * 2, run.tails()
  saved = [_saved_after_preemption(run.log(i)) for i in range(2)]
  assert saved[0] == saved[1] and len(saved[0]) == 1, (saved, run.tails())
  for i in range(2):   # JAX's notifier took the signal, and the agreement decided the step
    assert "(agreed sync point)" in run.log(i) and "SIGTERM received" not in run.log(i)
  (step,) = saved[0]
  assert sorted(int(p) for p in os.listdir(checkpoint.checkpoint_dir(workdir))
                if p.isdigit()) == [step]
  if drill == "only_process_1_during_startup":
    assert step == 1, run.tails()       # a notice before the first step stops after it
  assert step + 2 <= REFERENCE_STEPS, f"stopped at step {step}: raise REFERENCE_STEPS"
  _assert_params_equal(workdir, step, reference)

  # The same command (two steps further) resumes the saved step and continues bit for bit.
  resumed = Processes(workdir, tmp_path, "resume", f"--config.total_steps={step + 2}",
                      "--config.checkpoint.every=100000")
  assert resumed.wait() == [0, 0], resumed.tails()
  for i in range(2):
    assert f"Resuming from the checkpoint at step {step}." in resumed.log(i)
  _assert_params_equal(workdir, step + 2, reference)


@pytest.mark.slow
def test_one_process_with_the_runtime_saves_through_jax_notifier(tmp_path):
  """--distributed=on with one process: JAX's notifier (not a Python handler) catches SIGTERM."""
  workdir = str(tmp_path / "run")
  run = Processes(workdir, tmp_path, "one", "--config.total_steps=100000",
                  "--config.checkpoint.every=100000", "--config.mesh.data=2",
                  "--config.batch_size=8", "--distributed=on", count=1)
  run.wait_until(lambda: run.steps_logged() >= 2, "step 2")
  run.signal(0)
  assert run.wait() == [multihost.REQUEUE_EXIT_STATUS], run.tails()
  log = run.log(0)
  # JAX's notifier caught it (the sync point logs the step); our Python handler never ran.
  assert "(agreed sync point)" in log and "SIGTERM received" not in log
  (step,) = _saved_after_preemption(log)
  assert [int(p) for p in os.listdir(checkpoint.checkpoint_dir(workdir)) if p.isdigit()] == [step]
