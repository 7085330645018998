"""A synthetic in-memory data source: random uint8 images and token ids, no TensorFlow, no files.

For benchmarks (the GPU machines have no TensorFlow) and for multi-process tests: row r of the
global batch at step s is drawn from a generator seeded by (seed, s, r), so every process makes
exactly its own rows and the global batch does not depend on how many processes share it.
Batches carry the keys a method declares (data/views.py), like the real train pipeline: uint8
images, not augmented (the train step does that on the device), and int32 token ids.
Use it with --config.data.name=synthetic (evaluators are skipped: there is nothing to evaluate).
"""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from xclip_jax.data import views as views_lib

NAME = "synthetic"


def _colour_field(rng: np.random.Generator, size: int) -> np.ndarray:
  """A smooth random colour field, float [size, size, 3] in 0..255: a 4x4 grid of random
  colours, bilinearly interpolated (so blur and contrast act as on a photo, not on noise)."""
  grid = rng.uniform(0, 255, size=(4, 4, 3))
  position = np.linspace(0, 3, size)
  lower = np.minimum(np.floor(position).astype(int), 2)
  weight = position - lower
  interp = np.zeros((size, 4))
  interp[np.arange(size), lower] = 1 - weight
  interp[np.arange(size), lower + 1] = weight
  return np.einsum("ia,abc,jb->ijc", interp, grid, interp)


def make_row(config, seed: int, step: int, row: int,
             views: views_lib.Views = views_lib.SINGLE) -> dict[str, np.ndarray]:
  """One example: uint8 [S, S, 3] per declared image view, int32 [L] ids per text view.

  The image views of a row share one colour field (as crops of one photo share its content),
  each with its own pixel noise.
  """
  rng = np.random.default_rng([seed, step, row])
  size, length = config.model.image.image_size, config.model.text.context_length
  vocab = min(config.model.text.vocab_size, 1000)

  def text():
    ids = np.zeros(length, np.int32)
    end = rng.integers(2, length)
    ids[:end] = rng.integers(4, vocab, size=end)
    ids[end] = 2
    return ids

  field = _colour_field(rng, size)
  out = {}
  for view in views.image:
    noisy = field + rng.normal(0, 8, size=field.shape)
    out[view.key] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
  for view in views.text:
    out[view.key] = text()
  return out


def process_rows(global_batch: int, sharding: jax.sharding.Sharding) -> np.ndarray:
  """Indices of the global-batch rows this process's devices hold, in order."""
  indices = sharding.addressable_devices_indices_map((global_batch,))
  blocks = sorted({index[0].indices(global_batch)[:2] for index in indices.values()})
  return np.concatenate([np.arange(start, stop) for start, stop in blocks])


def host_batches(config, sharding: jax.sharding.Sharding, *, start_step: int = 0,
                 views: views_lib.Views = views_lib.SINGLE) -> Iterator[dict[str, np.ndarray]]:
  """Endless host batches (this process's rows) for steps start_step, start_step + 1, ...,
  with the keys `views` declares (train.py passes the method's)."""
  rows = process_rows(config.batch_size, sharding)
  step = start_step
  while True:
    examples = [make_row(config, config.seed, step, int(r), views) for r in rows]
    yield {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    step += 1


def global_batch(config, step: int = 0,
                 views: views_lib.Views = views_lib.SINGLE) -> dict[str, np.ndarray]:
  """The whole global batch of `step` on the host (benchmarks and single-process tests)."""
  examples = [make_row(config, config.seed, step, r, views)
              for r in range(config.batch_size)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
