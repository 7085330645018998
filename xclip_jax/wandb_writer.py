"""A clu MetricWriter that logs to Weights & Biases (config.wandb; the optional `wandb` extra).

One W&B run per workdir: its id is kept in <workdir>/wandb_run_id, so a resumed run (after a
preemption, or with more total_steps) continues the same W&B run (resume="allow"). A run that
starts from step 0 starts a new W&B run. W&B keeps each run's steps increasing: steps that a
preempted run had already logged past its last checkpoint are ignored by W&B when logged again
(its warning says so); metrics.jsonl and the TensorBoard events still hold them.

Offline mode (`config.wandb.mode=offline`, or WANDB_MODE=offline) writes the run under
<dir>/wandb/offline-run-*; `wandb sync` uploads it later.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from typing import Any, Mapping

import ml_collections
import numpy as np
from clu.metric_writers import interface

RUN_ID_FILE = "wandb_run_id"
INSTALL_HINT = ("config.wandb.enabled=True needs the wandb package: pip install 'xclip_jax[wandb]' "
                "(or pip install wandb), or leave config.wandb.enabled=False.")


def import_wandb():
  try:
    import wandb  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e
  return wandb


def _run_id(workdir: str, resume_step: int) -> str:
  """The workdir's W&B run id: the saved one when resuming, else a new one (saved)."""
  from etils import epath  # noqa: PLC0415
  path = epath.Path(workdir) / RUN_ID_FILE
  if resume_step and path.exists():
    return path.read_text().strip()
  # W&B's own ids: 8 characters of [a-z0-9] (its generator moved between versions).
  run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
  path.write_text(run_id + "\n")
  return run_id


def _local_dir(config_dir: str, workdir: str) -> str | None:
  """Where W&B keeps its files: config.wandb.dir; else $WANDB_DIR; else a local workdir (W&B
  needs a local directory: a gs:// workdir leaves W&B's default, ./wandb). Passed explicitly:
  W&B reads its environment once per process, so a second run in one process would else
  write where the first did."""
  if config_dir:
    return config_dir
  if os.environ.get("WANDB_DIR"):
    return os.environ["WANDB_DIR"]
  return None if "://" in workdir else workdir


class _WarningsOnly(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _quiet_wandb_logger() -> None:
  """W&B logs its set-up steps (the whole config among them) at INFO on the "wandb" logger; they
  would reach absl's stderr and train.log. W&B keeps them in its own debug.log anyway."""
  logger = logging.getLogger("wandb")
  if not any(isinstance(f, _WarningsOnly) for f in logger.filters):
    logger.addFilter(_WarningsOnly())


class WandbWriter(interface.MetricWriter):
  """Writes clu's summaries to a W&B run created from config.wandb (process 0 only)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, resume_step: int = 0):
    wandb = self._wandb = import_wandb()
    _quiet_wandb_logger()
    w = config.wandb
    directory = _local_dir(w.dir, workdir)
    if directory:
      os.makedirs(directory, exist_ok=True)
    self._run = wandb.init(
        project=w.project or None, name=w.name or None, mode=w.mode, dir=directory,
        id=_run_id(workdir, resume_step), resume="allow",
        config=config.to_dict())

  @property
  def run(self) -> Any:
    return self._run

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> None:
    del metadata
    self._run.log({k: np.asarray(v) for k, v in values.items()}, step=int(step))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._run.log({k: np.asarray(v).item() for k, v in scalars.items()}, step=int(step))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    # clu's images are [N, H, W, C] (or [H, W, C]); W&B takes one Image per picture.
    self._run.log({k: [self._wandb.Image(np.asarray(x)) for x in np.asarray(v).reshape(
        (-1,) + np.asarray(v).shape[-3:])] for k, v in images.items()}, step=int(step))

  def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
    # clu's videos are [N, T, H, W, C]; W&B's Video wants [T, C, H, W].
    self._run.log({k: [self._wandb.Video(np.moveaxis(np.asarray(x), -1, 1)) for x in
                       np.asarray(v)] for k, v in videos.items()}, step=int(step))

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
    self._run.log({k: [self._wandb.Audio(np.asarray(x), sample_rate=sample_rate) for x in
                       np.asarray(v)] for k, v in audios.items()}, step=int(step))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._run.log({k: str(v) for k, v in texts.items()}, step=int(step))

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    self._run.log({k: self._wandb.Histogram(np.asarray(v),
                                            num_bins=(num_buckets or {}).get(k, 64))
                   for k, v in arrays.items()}, step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._run.config.update(dict(hparams), allow_val_change=True)

  def flush(self) -> None:
    pass   # W&B streams every log call to its service process itself

  def close(self) -> None:
    if self._run is not None:
      self._run.finish()
      self._run = None
