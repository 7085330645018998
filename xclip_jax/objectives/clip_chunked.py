"""CLIP's symmetric InfoNCE as an explicit `jax.shard_map` with chunked logits, for very large
global batches.

Each device holds B/n image and text rows. It all-gathers the other modality's embeddings
([B, D], small) and computes the log-sum-exp of its rows' logits against all B columns in chunks
of `chunk` columns, streaming the maximum and the sum (each chunk rematerialised in the backward
pass). Peak memory per device is O(B/n x chunk) instead of the O(B/n x B) logits block (or worse)
that the compiler partitions from `clip.clip_loss`. The value and gradients are the same: the
all-gather's transpose is a reduce-scatter, the exact gradient of the gathered copies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from xclip_jax.parallel.mesh import BATCH_AXES


def _streaming_lse(rows: jax.Array, columns: jax.Array, scale: jax.Array, chunk: int) -> jax.Array:
  """logsumexp_j(scale * rows @ columns[j]) for every row, over column chunks."""
  num = columns.shape[0]
  chunk = min(chunk, num)
  if num % chunk:
    raise ValueError(f"chunk={chunk} must divide the global batch {num}.")
  blocks = columns.reshape(num // chunk, chunk, columns.shape[1])

  @jax.checkpoint
  def block_stats(block):
    logits = scale * rows @ block.T                                   # [b, chunk]
    top = jax.lax.stop_gradient(jnp.max(logits, axis=1))
    return top, jnp.sum(jnp.exp(logits - top[:, None]), axis=1)

  def body(carry, block):
    running_max, running_sum = carry
    top, total = block_stats(block)
    new_max = jnp.maximum(running_max, top)
    running_sum = running_sum * jnp.exp(running_max - new_max) + total * jnp.exp(top - new_max)
    return (new_max, running_sum), None

  init = (jnp.full(rows.shape[:1], -jnp.inf, rows.dtype), jnp.zeros(rows.shape[:1], rows.dtype))
  (final_max, final_sum), _ = jax.lax.scan(body, init, blocks)
  return final_max + jnp.log(final_sum)


def _sharded_directions(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array, *,
                        chunk: int, axes: tuple[str, ...], both: bool) -> jax.Array:
  """[i2t] or [i2t, t2i]: each direction's mean cross-entropy, diagonal positives."""
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  scale = jnp.asarray(scale, jnp.float32)
  global_batch = image_emb.shape[0]

  @functools.partial(jax.shard_map, in_specs=(P(axes), P(axes), P()), out_specs=P(),
                     check_vma=False)
  def sharded(image, text, s):
    all_texts = jax.lax.all_gather(text, axes, tiled=True)
    positive = s * jnp.sum(image * text, axis=1)
    losses = [jnp.sum(_streaming_lse(image, all_texts, s, chunk) - positive)]
    if both:
      all_images = jax.lax.all_gather(image, axes, tiled=True)
      losses.append(jnp.sum(_streaming_lse(text, all_images, s, chunk) - positive))
    return jax.lax.psum(jnp.stack(losses), axes) / global_batch

  return sharded(image_emb, text_emb, scale)


def clip_loss_chunked(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array, *,
                      chunk: int = 4096, axes: tuple[str, ...] = BATCH_AXES
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Same value and gradients as `clip.clip_loss`, computed shard by shard on the current mesh
  (`jax.set_mesh`), the batch split over `axes`. Metrics: each direction's loss."""
  loss_i2t, loss_t2i = _sharded_directions(image_emb, text_emb, scale, chunk=chunk, axes=axes,
                                           both=True)
  return 0.5 * (loss_i2t + loss_t2i), {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


def image_to_text_loss_chunked(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array, *,
                               chunk: int = 4096, axes: tuple[str, ...] = BATCH_AXES
                               ) -> jax.Array:
  """The image -> text half alone (DeCLIP's nearest-neighbour term): the same value and gradients
  as `nns.image_to_text_nce`; only the texts are gathered."""
  return _sharded_directions(image_emb, text_emb, scale, chunk=chunk, axes=axes, both=False)[0]
