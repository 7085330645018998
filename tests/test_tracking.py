"""Run records: metrics.jsonl (merged per step, resumed without duplicates), the log file,
samples/epochs, the W&B writer (offline), the profiler window, and their config checks."""

import glob
import gzip
import json
import logging as logging_std
import os
import shutil
import struct
import time
import sys

import numpy as np
import pytest
from absl import logging

from xclip_jax import config as config_lib
from xclip_jax import profiling, tracking, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tests.tiny import checkpoint_steps, tiny_config  # noqa: E402


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


# ---- metrics.jsonl ---------------------------------------------------------------------------

def test_jsonl_merges_a_steps_writes_and_a_resume_moves_later_steps_aside(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  w = tracking.JsonlWriter(path)
  w.write_scalars(1, {"loss": np.float32(2.5), "lr": 0.1})
  w.write_scalars(2, {"loss": 2.0})
  w.write_scalars(2, {"zeroshot/top1": 50.0})        # the evaluation after step 2's scalars
  w.write_scalars(3, {"loss": float("nan")})
  w.write_scalars(4, {"loss": 1.0})
  w.close()
  assert _lines(path) == [{"step": 1, "loss": 2.5, "lr": 0.1},
                          {"step": 2, "loss": 2.0, "zeroshot/top1": 50.0},
                          {"step": 3, "loss": "nan"}, {"step": 4, "loss": 1.0}]
  with open(path, "a") as f:
    f.write('{"step": 5, "lo')                        # a line torn by a crash

  # Resumed from the checkpoint at step 2: steps 3-5 move aside, the run writes them again.
  w = tracking.JsonlWriter(path, resume_step=2)
  w.write_scalars(3, {"loss": 1.5})
  w.close()
  assert _lines(path) == [{"step": 1, "loss": 2.5, "lr": 0.1},
                          {"step": 2, "loss": 2.0, "zeroshot/top1": 50.0},
                          {"step": 3, "loss": 1.5}]
  with open(tmp_path / tracking.DROPPED_FILE) as f:
    assert f.read() == '{"step": 3, "loss": "nan"}\n{"step": 4, "loss": 1.0}\n{"step": 5, "lo\n'


def test_remote_sink_is_rewritten_whole_on_flush(tmp_path, monkeypatch):
  # A gs:// path cannot be appended to; exercise that code path on a local file.
  monkeypatch.setattr(tracking, "_is_remote", lambda path: True)
  monkeypatch.setattr(tracking, "REMOTE_REWRITE_SECONDS", 1e9)
  path = str(tmp_path / "metrics.jsonl")
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
  w = tracking.JsonlWriter(path, resume_step=1)
  w.write_scalars(2, {"loss": 2.0})
  w.write_scalars(2, {"top1": 7.0})
  w.flush()
  assert _lines(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "top1": 7.0}]
  w.write_scalars(3, {"loss": 1.0})
  assert len(_lines(path)) == 2                     # throttled: not rewritten yet
  w.close()
  assert _lines(path)[-1] == {"step": 3, "loss": 1.0}


def test_a_dry_run_leaves_metrics_jsonl_and_wandb_alone(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
  writer = tracking.make_writer(tiny_config("", **{"dry_run": True, "wandb.enabled": True}),
                                str(tmp_path), resume_step=0)
  writer.close()
  assert _lines(tmp_path / "metrics.jsonl") == [{"step": 7, "loss": 1.0}]
  assert not os.path.exists(tmp_path / "wandb_run_id")
  assert not os.path.exists(tmp_path / tracking.DROPPED_FILE)


def test_progress_counts_the_global_batch_per_step():
  assert tracking.progress(3, 64, None) == {"samples_seen": 192.0}
  assert tracking.progress(3, 64, 128) == {"samples_seen": 192.0, "epochs": 1.5}


# ---- the log file ----------------------------------------------------------------------------

def test_log_file_holds_the_runs_records_only_while_open(tmp_path, caplog):
  caplog.set_level(logging_std.INFO)
  with tracking.log_file(str(tmp_path)) as path:
    logging.info("inside %d", 42)
    logging_std.getLogger("some.library").warning("a library's warning")
  logging.info("after the run")
  assert path == str(tmp_path / "train.log")
  text = open(path).read()
  lines = text.splitlines()
  assert len(lines) == 2 and lines[0].startswith("I") and lines[0].endswith("] inside 42")
  assert lines[1].startswith("W") and "a library's warning" in lines[1]
  assert "after the run" not in text
  assert tracking.log_file_name(3) == "train.process3.log"


# ---- config checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,message", [
    ("wandb.mode", "cloud", "config.wandb.mode='cloud': use online or offline"),
    ("profile.num_steps", -1, "config.profile.num_steps=-1 must be >= 0"),
    ("profile.start_step", 0, "config.profile.start_step=0 must be >= 1"),
    ("profile.start_step", 4, r"traces steps 4-5, past config.total_steps=4"),
])
def test_bad_tracking_or_profile_fields_are_refused(key, value, message):
  c = tiny_config("", **{"profile.num_steps": 2, "profile.start_step": 1, key: value})
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_wandb_enabled_without_the_package_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError
  with pytest.raises(ImportError, match=r"pip install 'xclip_jax\[wandb\]'"):
    config_lib.validate(tiny_config("", **{"wandb.enabled": True}))


# ---- W&B (offline, no network) -------------------------------------------------------------

def _wandb_history(wandb_dir):
  """{step: logged values} from the offline runs' .wandb files (W&B's record log: a 7-byte
  header, then records in 32 KiB blocks, each chunk headed by crc32, length, type)."""
  from wandb.proto import wandb_internal_pb2
  history = {}
  for path in sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "*.wandb"))):
    data, pos, record = open(path, "rb").read(), 7, b""
    while pos + 7 <= len(data):
      if 32768 - pos % 32768 < 7:
        pos += 32768 - pos % 32768
        continue
      _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
      if not length and not kind:
        break
      record += data[pos + 7:pos + 7 + length]
      pos += 7 + length
      if kind in (1, 4):                              # a full record, or a record's last chunk
        r = wandb_internal_pb2.Record()
        r.ParseFromString(record)
        record = b""
        if r.WhichOneof("record_type") == "history":
          values = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item}
          history[values["_step"]] = values
  return history


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
  monkeypatch.setenv("WANDB_SILENT", "true")
  os.makedirs(tmp_path / "wandb_dir")
  return str(tmp_path / "wandb_dir")


def test_wandb_writer_logs_offline_and_a_resume_keeps_the_run_id(offline_wandb, tmp_path):
  from xclip_jax import wandb_writer
  config = tiny_config("", **{"wandb.enabled": True, "wandb.mode": "offline",
                              "wandb.project": "xclip-test", "wandb.name": "tiny"})
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  w = wandb_writer.WandbWriter(config, workdir)
  run_id = w.run.id
  assert w.run.name == "tiny" and w.run.config["batch_size"] == 16
  w.write_scalars(1, {"loss": np.float32(2.5), "lr": 0.125})
  w.write_scalars(2, {"loss": 2.0})
  w.close()
  w = wandb_writer.WandbWriter(config, workdir, resume_step=2)
  assert w.run.id == run_id                         # the same W&B run continues
  w.write_scalars(3, {"loss": 1.5})
  w.close()
  # W&B's service process writes the record file; on a loaded machine it may land a moment
  # after finish() returns.
  deadline = time.time() + 30
  while 3 not in (history := _wandb_history(offline_wandb)) and time.time() < deadline:
    time.sleep(0.2)
  assert {k: {n: v for n, v in h.items() if not n.startswith("_")}
          for k, h in history.items()} == {1: {"loss": 2.5, "lr": 0.125}, 2: {"loss": 2.0},
                                           3: {"loss": 1.5}}
  # A new run (step 0) in the same workdir is a new W&B run.
  w = wandb_writer.WandbWriter(config, workdir, resume_step=0)
  assert w.run.id != run_id
  w.close()


# ---- end to end --------------------------------------------------------------------------

@pytest.mark.slow
def test_run_writes_jsonl_log_and_epochs_and_resumes_without_duplicates(demo_dir, tmp_path,
                                                                        caplog):
  from xclip_jax.data import datasets
  caplog.set_level(logging_std.INFO)     # main.py's verbosity: the log file holds INFO records
  workdir = str(tmp_path / "run")
  config = tiny_config(demo_dir, **{"accum_steps": 2, "evals.zeroshot.max_examples": 32,
                                    "evals.retrieval.enabled": False})
  metrics = train.run(config, workdir)
  lines = _lines(os.path.join(workdir, tracking.METRICS_FILE))
  size = datasets.prepare_dataset("xclip_demo", demo_dir).info.splits["train"].num_examples
  assert [line["step"] for line in lines] == [1, 2, 3, 4]
  for line in lines:   # 16 samples per step (2 micro-batches of 8 make one step)
    assert line["samples_seen"] == 16 * line["step"]
    assert line["epochs"] == pytest.approx(16 * line["step"] / size)
  # The last line holds the step's scalars and the evaluation at the end, as run() returned.
  assert lines[-1]["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
  assert lines[-1]["zeroshot/top1"] == pytest.approx(metrics["zeroshot/top1"])
  log = open(os.path.join(workdir, tracking.LOG_FILE)).read()
  assert "Train step compiled" in log and "step 4/4" in log

  # A run preempted after step 4 but before its checkpoint: only step 2's remains.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  assert checkpoint_steps(workdir) == [2]
  resumed = train.run(config, workdir)
  lines_again = _lines(os.path.join(workdir, tracking.METRICS_FILE))
  assert [line["step"] for line in lines_again] == [1, 2, 3, 4]
  assert lines_again[:2] == lines[:2]
  assert [line["loss"] for line in lines_again] == pytest.approx([x["loss"] for x in lines])
  assert resumed["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
  dropped = _lines(os.path.join(workdir, tracking.DROPPED_FILE))
  assert dropped == lines[2:]
  log = open(os.path.join(workdir, tracking.LOG_FILE)).read()
  assert "Resuming from the checkpoint at step 2" in log and "Train step compiled" in log


def _synthetic(**overrides):
  return tiny_config("", **{"data.name": "synthetic", "checkpoint.every": 100, **overrides})


def _train_step_executions(workdir):
  """How many times the jitted train step ran inside the trace(s) under <workdir>/profile."""
  (trace,) = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*",
                                    "perfetto_trace.json.gz"))
  with gzip.open(trace) as f:
    events = json.load(f)["traceEvents"]
  return sum(e.get("name") == "CommonPjRtLoadedExecutable::Execute (jit_train_step)"
             for e in events)


@pytest.mark.slow
def test_profile_traces_exactly_the_window(tmp_path):
  workdir = str(tmp_path / "run")
  train.run(_synthetic(**{"profile.start_step": 2, "profile.num_steps": 2,
                          "profile.perfetto": True}), workdir)
  assert len(glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*",
                                    "*.xplane.pb"))) == 1
  assert _train_step_executions(workdir) == 2        # steps 2 and 3 of 4
  assert not profiling._active


@pytest.mark.slow
def test_run_with_wandb_offline_logs_what_metrics_jsonl_holds(offline_wandb, tmp_path):
  # Also the run with profiling off (the default): it writes no trace.
  workdir = str(tmp_path / "run")
  train.run(_synthetic(**{"total_steps": 2, "wandb.enabled": True, "wandb.mode": "offline"}),
            workdir)
  lines = _lines(os.path.join(workdir, tracking.METRICS_FILE))
  history = _wandb_history(offline_wandb)
  assert sorted(history) == [1, 2]
  for line in lines:
    for key in ("loss", "lr", "samples_seen"):
      assert history[line["step"]][key] == pytest.approx(line[key])
  assert "epochs" not in lines[0]                   # synthetic data: no dataset size
  assert not os.path.exists(os.path.join(workdir, "profile"))
