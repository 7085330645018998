"""A synthetic in-memory data source: random images and token ids, no TensorFlow, no files.

For benchmarks (the GPU machines have no TensorFlow) and for multi-process tests: row r of the
global batch at step s is drawn from a generator seeded by (seed, s, r), so every process makes
exactly its own rows and the global batch does not depend on how many processes share it.
Use it with --config.data.name=synthetic (evaluators are skipped: there is nothing to evaluate).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import numpy as np

NAME = "synthetic"


@dataclasses.dataclass(frozen=True)
class SyntheticTokenizer:
  """The token facts a run needs, without a SentencePiece model (ids as in data/tokenizer.py)."""
  vocab_size: int
  pad_id: int = 0
  unk_id: int = 1
  eos_id: int = 2
  mask_id: int = 3


def make_row(config, seed: int, step: int, row: int, image_views: int = 1,
             text_views: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([seed, step, row])
  size, length = config.model.image.image_size, config.model.text.context_length
  vocab = min(config.model.text.vocab_size, 1000)

  def text():
    ids = np.zeros(length, np.int32)
    end = rng.integers(2, length)
    ids[:end] = rng.integers(4, vocab, size=end)
    ids[end] = 2
    return ids

  out = {"image": rng.normal(size=(size, size, 3)).astype(np.float32), "text": text()}
  for view in range(2, image_views + 1):          # image2 (DeCLIP), image2 + image3 (SLIP)
    out[f"image{view}"] = rng.normal(size=(size, size, 3)).astype(np.float32)
  if text_views == 2:
    out["text_aug"] = text()
  return out


def process_rows(global_batch: int, sharding: jax.sharding.Sharding) -> np.ndarray:
  """Indices of the global-batch rows this process's devices hold, in order."""
  indices = sharding.addressable_devices_indices_map((global_batch,))
  blocks = sorted({index[0].indices(global_batch)[:2] for index in indices.values()})
  return np.concatenate([np.arange(start, stop) for start, stop in blocks])


def host_batches(config, sharding: jax.sharding.Sharding, *, start_step: int = 0,
                 image_views: int = 1, text_views: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless host batches (this process's rows) for steps start_step, start_step + 1, ..."""
  rows = process_rows(config.batch_size, sharding)
  step = start_step
  while True:
    examples = [make_row(config, config.seed, step, int(r), image_views, text_views) for r in rows]
    yield {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    step += 1


def global_batch(config, step: int = 0, image_views: int = 1,
                 text_views: int = 1) -> dict[str, np.ndarray]:
  """The whole global batch of `step` on the host (benchmarks and single-process tests)."""
  examples = [make_row(config, config.seed, step, r, image_views, text_views)
              for r in range(config.batch_size)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
