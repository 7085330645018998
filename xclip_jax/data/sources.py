"""Where a run's train batches come from: the factory that chooses between a TFDS dataset and the
synthetic in-memory source, so the train loop asks one object instead of branching on the name.

A source gives the tokenizer (None where there is no text to encode) and its TextSpec, this
process's host batches from a start step, and whether in-loop evaluation has data to read.
TensorFlow is imported only by the TFDS source (benchmarks and synthetic runs go without it).
"""

from __future__ import annotations

from typing import Iterable, Protocol

import jax
import ml_collections
import numpy as np

from xclip_jax.data import synthetic
from xclip_jax.data import text_spec as text_spec_lib
from xclip_jax.data import views as views_lib


class DataSource(Protocol):
  tokenizer: text_spec_lib.Tokenizer | None
  text_spec: text_spec_lib.TextSpec
  evaluates: bool           # whether in-loop evaluators have data to read
  dataset_size: int | None  # examples in the train split (the epochs metric), None if unknown

  def host_batches(self, views: views_lib.Views, sharding: jax.sharding.Sharding, *,
                   host_batch: int, start_step: int) -> Iterable[dict[str, np.ndarray]]:
    ...


class SyntheticSource:
  """Deterministic in-memory batches (data/synthetic.py): no files, no tokenizer, no evaluation."""

  evaluates = False
  dataset_size = None       # endless

  def __init__(self, config: ml_collections.ConfigDict):
    self._config = config
    self.tokenizer = None     # token ids laid out as SentencePiece reserves them
    self.text_spec = text_spec_lib.TextSpec.reserved(config.model.text.vocab_size)

  def host_batches(self, views, sharding, *, host_batch, start_step):
    del host_batch   # the sharding says which rows are this process's
    return synthetic.host_batches(self._config, sharding, start_step=start_step, views=views)


class TFDSSource:
  """A TFDS dataset (prepared here, embedded demo built locally if needed) and its tokenizer."""

  evaluates = True

  def __init__(self, config: ml_collections.ConfigDict):
    from xclip_jax.data import datasets  # noqa: PLC0415  (TensorFlow only where data is read)
    from xclip_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415
    from xclip_jax import tracking  # noqa: PLC0415
    self._config = config
    builder = datasets.prepare_dataset(config.data.name, config.data.data_dir or None,
                                       config.data.builtin)
    self.dataset_size = (None if config.data.get("mixture")   # epochs of a mixture: undefined
                         else tracking.split_size(builder, config.data.split))
    from xclip_jax.data import mixture  # noqa: PLC0415
    mixture.prepare_sources(config.data)       # config.data.mixture's datasets, if any
    self.tokenizer = tokenizer_lib.resolve_tokenizer(config)
    self.text_spec = self.tokenizer.spec

  def host_batches(self, views, sharding, *, host_batch, start_step):
    del sharding
    from xclip_jax.data import train_pipeline  # noqa: PLC0415
    config = self._config
    # Exact resume replays the stream to start_step; otherwise a fresh shuffle seeded by it.
    position = (dict(start_step=start_step) if config.data.exact_resume
                else dict(seed=config.seed + start_step))
    return train_pipeline.make_train_dataset(     # a tf.data.Dataset of numpy host batches
        config, self.tokenizer, views=views, process_index=jax.process_index(),
        process_count=jax.process_count(), host_batch_size=host_batch, **position)


def make_source(config: ml_collections.ConfigDict) -> DataSource:
  """The source config.data.name names: `synthetic` or a TFDS dataset."""
  if config.data.name == synthetic.NAME:
    return SyntheticSource(config)
  return TFDSSource(config)
