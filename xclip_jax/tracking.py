"""What a run records beside its checkpoints: metrics.jsonl, a plain-text log, optional W&B.

`make_writer` gives the train loop one clu MetricWriter that fans out to the TensorBoard events
(clu's SummaryWriter), `<workdir>/metrics.jsonl` (`JsonlWriter`: one JSON line per logged step,
{"step": N, every scalar}, eval results merged into their step's line) and, with
`config.wandb.enabled`, a Weights & Biases run (wandb_writer.py). Only process 0 writes them.

`log_file` copies the run's log records (what absl prints) into `<workdir>/train.log`
(process 0; `train.process<i>.log` for the others), appended across resumes.

A resumed run continues metrics.jsonl from the checkpoint's step: lines for later steps, written
by a run that stopped before its next checkpoint, are moved to metrics.dropped.jsonl (and the
count logged), so every step has one line and nothing written is lost.
"""

from __future__ import annotations

import contextlib
import json
import logging as logging_std
import math
import os
import time
from typing import Any, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu.metric_writers import interface

METRICS_FILE = "metrics.jsonl"
DROPPED_FILE = "metrics.dropped.jsonl"
LOG_FILE = "train.log"
# A remote (gs://...) file cannot be appended to: it is rewritten whole, at most this often.
REMOTE_REWRITE_SECONDS = 30.0


def _is_remote(path: str) -> bool:
  return "://" in path


def _join(workdir: str, name: str) -> str:
  return f"{workdir.rstrip('/')}/{name}" if _is_remote(workdir) else os.path.join(workdir, name)


def _sibling(path: str, name: str) -> str:
  return f"{path.rsplit('/', 1)[0]}/{name}" if _is_remote(path) else os.path.join(
      os.path.dirname(path), name)


class TextSink:
  """An append-only text file, local (appended and flushed as written) or remote (gs://, via
  etils.epath: kept in memory and rewritten whole on flush, throttled to REMOTE_REWRITE_SECONDS
  unless forced). `truncate(size)` drops what was written after `size` bytes."""

  def __init__(self, path: str):
    self.path = path
    self._remote = _is_remote(path)
    if self._remote:
      from etils import epath  # noqa: PLC0415  (Orbax's path library)
      self._epath = epath.Path(path)
      self._data = bytearray(self._epath.read_bytes() if self._epath.exists() else b"")
      self._written_at = 0.0
      self._dirty = False
    else:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._file = open(path, "ab")   # noqa: SIM115  (open for the run's lifetime)

  @property
  def size(self) -> int:
    return len(self._data) if self._remote else self._file.tell()

  def write(self, text: str) -> None:
    if self._remote:
      self._data += text.encode()
      self._dirty = True
      self.flush(force=False)
    else:
      self._file.write(text.encode())
      self._file.flush()

  def truncate(self, size: int) -> None:
    if self._remote:
      del self._data[size:]
      self._dirty = True
    else:
      self._file.truncate(size)    # appends then go to the new end (O_APPEND)

  def flush(self, force: bool = True) -> None:
    if not self._remote:
      self._file.flush()
    elif self._dirty and (force or time.time() - self._written_at >= REMOTE_REWRITE_SECONDS):
      self._epath.write_bytes(bytes(self._data))
      self._written_at, self._dirty = time.time(), False

  def close(self) -> None:
    self.flush()
    if not self._remote:
      self._file.close()


def _read_text(path: str) -> str | None:
  from etils import epath  # noqa: PLC0415
  p = epath.Path(path)
  return p.read_text() if p.exists() else None


def drop_lines_after(path: str, step: int, dropped_path: str) -> int:
  """Keeps the lines of the JSONL file at `path` whose step is <= `step`; the others (and torn
  lines a crash left) are appended to `dropped_path`. Returns how many were dropped."""
  text = _read_text(path)
  if not text:
    return 0
  kept, dropped = [], []
  for line in text.splitlines():
    try:
      keep = int(json.loads(line)["step"]) <= step
    except (ValueError, KeyError, TypeError):
      keep = False
    (kept if keep else dropped).append(line + "\n")
  if dropped:
    from etils import epath  # noqa: PLC0415
    old = _read_text(dropped_path) or ""
    epath.Path(dropped_path).write_text(old + "".join(dropped))
    epath.Path(path).write_text("".join(kept))
  return len(dropped)


def _scalar(value: Any) -> float | int:
  value = np.asarray(value).item()
  return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def _json_number(value: float | int) -> float | int | str:
  """JSON has no NaN or infinity: those are written as the strings "nan", "inf", "-inf"."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class JsonlWriter(interface.MetricWriter):
  """Scalars (and texts) as JSON lines, {"step": N, name: value, ...}: one line per step.

  Writes for the step of the last line (the evaluation after a step's training scalars) are
  merged into that line, rewritten in place. With `resume_step`, lines for later steps are first
  moved to metrics.dropped.jsonl beside it (see the module docstring).
  """

  def __init__(self, path: str, *, resume_step: int | None = None):
    if resume_step is not None:
      dropped_path = _sibling(path, DROPPED_FILE)
      n = drop_lines_after(path, resume_step, dropped_path)
      if n:
        logging.warning("%s: moved %d lines for steps after the resumed step %d (written by a "
                        "run that stopped before saving them) to %s.", path, n, resume_step,
                        dropped_path)
    self._sink = TextSink(path)
    self._last_step = None
    self._last_values: dict[str, Any] = {}
    self._last_offset = 0

  def _write(self, step: int, values: Mapping[str, Any]) -> None:
    step = int(step)
    if step == self._last_step:
      self._sink.truncate(self._last_offset)
      self._last_values.update(values)
    else:
      self._last_step, self._last_values = step, dict(values)
      self._last_offset = self._sink.size
    line = {"step": step, **{k: self._last_values[k] for k in sorted(self._last_values)}}
    self._sink.write(json.dumps(line) + "\n")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._write(step, {k: _json_number(_scalar(v)) for k, v in scalars.items()})

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._write(step, {k: str(v) for k, v in texts.items()})

  # Arrays and hyperparameters are not scalars: TensorBoard and W&B hold those.
  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata

  def write_images(self, step, images) -> None:
    del step, images

  def write_videos(self, step, videos) -> None:
    del step, videos

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del step, audios, sample_rate

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def write_hparams(self, hparams) -> None:
    del hparams

  def flush(self) -> None:
    self._sink.flush()

  def close(self) -> None:
    self._sink.close()


def make_writer(config: ml_collections.ConfigDict, workdir: str, *,
                resume_step: int = 0) -> metric_writers.MetricWriter:
  """TensorBoard events + metrics.jsonl (+ W&B with config.wandb.enabled) on process 0; an empty
  writer elsewhere. `resume_step`: the step this run starts from (0 for a new run).

  Call it before compiling, so that a W&B error (no login, no network for online mode) comes
  first. A dry run (config.dry_run) logs nothing: it gets the events writer only, leaving
  metrics.jsonl as it is and creating no W&B run.
  """
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  writers = [metric_writers.SummaryWriter(workdir)]
  if config.dry_run:
    return metric_writers.MultiWriter(writers)
  writers.append(JsonlWriter(_join(workdir, METRICS_FILE), resume_step=resume_step))
  if config.wandb.enabled:
    from xclip_jax import wandb_writer  # noqa: PLC0415  (wandb is an optional extra)
    writers.append(wandb_writer.WandbWriter(config, workdir, resume_step=resume_step))
  return metric_writers.MultiWriter(writers)


def progress(step: int, global_batch: int, dataset_size: int | None) -> dict[str, float]:
  """samples_seen = step x the global batch (config.batch_size: with accumulation, every
  micro-batch of a step together), and epochs = samples_seen / dataset_size where it is known."""
  out = {"samples_seen": float(step * global_batch)}
  if dataset_size:
    out["epochs"] = step * global_batch / dataset_size
  return out


def split_size(builder: Any, split: str) -> int | None:
  """Examples in a TFDS split (slices such as train[:90%] too), from the dataset info; None
  where the info does not say (epochs are then not logged)."""
  try:
    n = int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, TypeError, AttributeError):
    n = 0
  if n <= 0:
    logging.info("The size of split %r is unknown: the epochs metric is not logged.", split)
    return None
  return n


class _SinkHandler(logging_std.Handler):
  """Writes formatted records to a TextSink."""

  def __init__(self, sink: TextSink):
    super().__init__()
    self.sink = sink

  def emit(self, record: logging_std.LogRecord) -> None:
    try:
      self.sink.write(self.format(record) + "\n")
    except Exception:  # noqa: BLE001  (logging must never stop the run)
      self.handleError(record)

  def close(self) -> None:
    self.sink.close()
    super().close()


def log_file_name(process_index: int) -> str:
  return LOG_FILE if process_index == 0 else f"train.process{process_index}.log"


@contextlib.contextmanager
def log_file(workdir: str) -> Iterator[str | None]:
  """While open, every log record that reaches the root logger (absl's and the libraries') is
  also appended to <workdir>/train.log, formatted as absl prints it; yields the path.

  The absl handler's filters (main.py's quiet-Orbax filter) apply to the file too. A workdir
  that cannot be written gets no log file here: the run's own check reports that clearly.
  """
  from absl.logging import PythonFormatter  # noqa: PLC0415
  path = _join(workdir, log_file_name(jax.process_index()))
  try:
    handler = _SinkHandler(TextSink(path))
  except Exception as e:  # noqa: BLE001  (the workdir check reports what to change)
    logging.warning("No log file %s (%s).", path, e)
    yield None
    return
  handler.setFormatter(PythonFormatter())
  for f in logging.get_absl_handler().filters:
    handler.addFilter(f)
  root = logging_std.getLogger()
  root.addHandler(handler)
  try:
    yield path
  finally:
    root.removeHandler(handler)
    handler.close()

