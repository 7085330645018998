"""Metric logging: one clu writer (TensorBoard events, metrics.jsonl, W&B: tracking.make_writer)
and a console progress line.

Only process 0 writes; the others log nothing, so multi-host runs do not write N copies.
"""

from __future__ import annotations

import time
from typing import Mapping

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from xclip_jax import tracking


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricLogger:
  """Writes scalars and tracks throughput between log points."""

  def __init__(self, workdir: str, *, total_steps: int, global_batch: int,
               writer: metric_writers.MetricWriter | None = None,
               dataset_size: int | None = None):
    """`writer`: where scalars go (default: TensorBoard events in `workdir`, process 0 only);
    `dataset_size`: examples in the train split, for the epochs metric (None: unknown)."""
    self.is_writer = jax.process_index() == 0
    # The console line below is our own (with progress and ETA), not a clu LoggingWriter.
    if writer is None:
      writer = (metric_writers.SummaryWriter(workdir) if self.is_writer
                else metric_writers.MultiWriter([]))
    self._writer = writer
    self._total = total_steps
    self._batch = global_batch
    self._dataset_size = dataset_size
    self._start_time = None
    self._start_step = None
    self._last_time = None
    self._last_step = None

  def start(self, step: int) -> None:
    """Marks the first step whose time counts (call after the step function is compiled)."""
    self._start_time = self._last_time = time.perf_counter()
    self._start_step = self._last_step = step

  def timing(self, step: int) -> dict[str, float]:
    """Step time and images/s since the last call; ETA from the run's average so far; samples
    seen and epochs (tracking.progress)."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    dt = now - self._last_time
    self._last_time, self._last_step = now, step
    avg = (now - self._start_time) / max(step - self._start_step, 1)
    return {"step_time": dt / steps, "images_per_sec": self._batch * steps / max(dt, 1e-9),
            "eta_seconds": avg * (self._total - step),
            **tracking.progress(step, self._batch, self._dataset_size)}

  def write(self, step: int, scalars: Mapping[str, float], *, console: bool = True) -> None:
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._writer.write_scalars(step, scalars)
    if console and self.is_writer:
      eta = scalars.get("eta_seconds")
      head = f"step {step}/{self._total}"
      if eta is not None:
        head += f" ({100.0 * step / self._total:.0f}%, eta {_format_duration(eta)})"
      body = "  ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()) if k != "eta_seconds")
      logging.info("%s  %s", head, body)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
