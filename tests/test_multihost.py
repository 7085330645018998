"""Two processes on localhost (CPU, gloo collectives) against one process with the same 8 devices:
same loss trajectory; a 2-process checkpoint resumes in 1 process; evaluation matches too."""

import glob
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from xclip_jax.parallel import multihost

from tests.tiny import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--config=configs/clip.py:demo", "--config.data.name=synthetic", "--config.batch_size=16",
        "--config.log_every=1", "--config.optim.warmup_steps=1", "--config.model.embed_dim=16",
        "--config.model.image.width=32", "--config.model.image.layers=2",
        "--config.model.image.heads=2", "--config.model.image.patch_size=16",
        "--config.model.text.width=32", "--config.model.text.layers=2",
        "--config.model.text.heads=2", "--config.checkpoint.every=2",
        "--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.optim.eps=1e-3",
        # Constant after warmup: a longer run (a resume) compiles the same program (cached).
        "--config.optim.schedule=constant"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(workdir, steps, processes, extra=()):
  args = [sys.executable, "-m", "xclip_jax.main", *TINY, f"--workdir={workdir}",
          f"--config.total_steps={steps}", *extra]
  if processes == 1:
    out = subprocess.run(args, cwd=ROOT, env=subprocess_env(8), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [out.stderr]
  port = _free_port()
  procs = [subprocess.Popen(args + [f"--coordinator_address=localhost:{port}",
                                    f"--num_processes={processes}", f"--process_id={i}"],
                            cwd=ROOT, env=subprocess_env(8 // processes), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(processes)]
  logs = []
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    logs.append(err)
  return logs


def _losses(workdir, tag="loss"):
  """step -> loss (or another scalar) from the TensorBoard events process 0 wrote."""
  losses = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


def test_auto_mode_stays_single_process_without_a_cluster(monkeypatch):
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  assert multihost.detected_cluster() is None
  assert multihost.initialize(mode="auto") is False
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert multihost.detected_cluster() == "slurm"
  with pytest.raises(ValueError, match="num_processes"):
    multihost.initialize("localhost:1234", mode="auto")


@pytest.mark.slow
def test_two_processes_match_one_and_resume_across_process_counts(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  logs = _run(two, 4, processes=2)
  assert "process 1 of 2" in logs[1] and "global batch 16 (8 per process)" in logs[0]
  # One process, 6 steps straight (the schedule is constant after warmup, so the first 4 steps
  # are those of a 4-step run).
  _run(one, 6, processes=1)
  l1, l2 = _losses(one), _losses(two)
  assert sorted(l1) == [1, 2, 3, 4, 5, 6] and sorted(l2) == [1, 2, 3, 4]
  np.testing.assert_allclose([l2[s] for s in range(1, 5)], [l1[s] for s in range(1, 5)],
                             rtol=1e-5)
  assert l1[1] != l1[4]
  # The 2-process checkpoint at step 4 resumes in 1 process and continues like the 1-process run.
  logs = _run(two, 6, processes=1)
  assert "Resuming from the checkpoint at step 4" in logs[0]
  l2 = _losses(two)
  np.testing.assert_allclose([l2[5], l2[6]], [l1[5], l1[6]], rtol=1e-5)


def _evaluate(workdir, processes, extra):
  args = [sys.executable, "-m", "xclip_jax.evaluate", f"--workdir={workdir}", *extra]
  port = _free_port()
  if processes > 1:
    cmds = [args + [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                    f"--process_id={i}"] for i in range(processes)]
  else:
    cmds = [args]
  procs = [subprocess.Popen(c, cwd=ROOT, env=subprocess_env(8 // processes),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for c in cmds]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  import json
  return json.loads(outs[0][outs[0].index("{"):])


@pytest.mark.slow
def test_evaluation_with_two_processes_equals_one(demo_dir, tmp_path):
  from tests.tiny import tiny_config
  from xclip_jax import train
  workdir = str(tmp_path / "run")
  config = tiny_config(demo_dir, total_steps=2, **{"checkpoint.every": 2})
  config.evals.zeroshot.enabled = False
  config.evals.retrieval.enabled = False
  train.run(config, workdir)
  # 37 test images over 2 processes x 4 devices with batch 16: uneven slices and padding.
  extra = ["--config.evals.zeroshot.enabled=True", "--config.evals.zeroshot.max_examples=37",
           "--config.evals.zeroshot.batch_size=16", "--config.evals.retrieval.enabled=True",
           "--config.evals.retrieval.max_examples=37", "--config.evals.retrieval.batch_size=16",
           "--config.evals.linear_probe.enabled=True", "--config.evals.linear_probe.max_examples=45",
           "--config.evals.linear_probe.steps=20", "--config.evals.linear_probe.batch_size=16",
           f"--config.evals.linear_probe.data_dir={demo_dir}"]
  single = _evaluate(workdir, 1, extra)
  double = _evaluate(workdir, 2, extra)
  assert single["zeroshot/examples"] == 37 and single["retrieval/images"] == 37
  assert single["linear_probe/train_examples"] == 45
  for key, value in single.items():
    assert double[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.slow
def test_data_counters_are_summed_over_processes_and_survive_a_resume(demo_dir, tmp_path):
  from xclip_jax import checkpoint
  workdir = str(tmp_path / "run")
  demo = ["--config.data.name=xclip_demo", f"--config.data.data_dir={demo_dir}",
          "--config.data.shuffle_buffer=64", "--config.evals.zeroshot.enabled=False",
          "--config.evals.retrieval.enabled=False"]
  _run(workdir, 2, processes=2, extra=demo)
  _run(workdir, 4, processes=2, extra=demo)          # resumes from step 2
  records = _losses(workdir, "data/records")
  # 8 records per process per step (host batch 8, no spares), summed over both processes, and
  # continued from the checkpoint's totals after the resume (not restarted at 0).
  assert records == {1: 16.0, 2: 32.0, 3: 48.0, 4: 64.0}
  manager = checkpoint.Checkpointer(workdir, every=2, keep=3)
  for step in (2, 4):
    saved = manager.restore_counters(step)
    assert saved["records"] == 16 * step
    for name, value in saved.items():          # the logged data/* values are the saved totals
      assert _losses(workdir, f"data/{name}")[step] == value, name
  truncated = _losses(workdir, "data/caption_truncated")
  assert truncated[3] >= truncated[2] and truncated[4] >= truncated[3]
  manager.close()
