"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), over the global batch and as a ring.

  L = -1/B Σ_i Σ_j log σ(z_ij (t · x_i·y_j + b)),   z_ij = 1 if i == j else -1

with a learnable temperature t = exp(t') (t' = log 10 at init) and bias b (-10 at init). Every
pair is an independent binary problem, so no softmax normalises over the batch.

`siglip_loss_ring` is the paper's memory-efficient form as an explicit `jax.shard_map`: each
device keeps its images and passes text chunks around the ring of devices with `ppermute`, adding
the loss of its images against each visiting chunk; only one [B/n, B/n] block exists at a time.
Its value and gradients equal `siglip_loss`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from xclip_jax.parallel.mesh import BATCH_AXES


def _pair_loss(image: jax.Array, text: jax.Array, t: jax.Array, b: jax.Array,
               positive: bool) -> jax.Array:
  """Sum over the block of -log σ(z (t x·y + b)); z = +1 on the diagonal if `positive`."""
  logits = t * image @ text.T + b
  labels = -jnp.ones_like(logits)
  if positive:
    labels = labels + 2 * jnp.eye(logits.shape[0], dtype=logits.dtype)
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array,
                bias: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over images of the summed pairwise sigmoid losses (global arrays)."""
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  loss = _pair_loss(image_emb, text_emb, temperature, bias, True) / image_emb.shape[0]
  logits = temperature * image_emb @ text_emb.T + bias
  labels = jnp.arange(logits.shape[0])
  return loss, {"acc_i2t": jnp.mean(jnp.argmax(logits, 1) == labels),
                "acc_t2i": jnp.mean(jnp.argmax(logits, 0) == labels)}


def siglip_loss_ring(image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array,
                     bias: jax.Array, *, axes: tuple[str, ...] = BATCH_AXES) -> jax.Array:
  """`siglip_loss`'s value, computed on the current mesh (`jax.set_mesh`) by a ring of ppermutes
  of text chunks over the batch axes."""
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  global_batch = image_emb.shape[0]
  mesh = jax.sharding.get_abstract_mesh()
  n = 1
  for axis in axes:
    n *= mesh.shape[axis]
  # Device i sends its current chunk to device i - 1 (in the flattened order of `axes`).
  perm = [(i, (i - 1) % n) for i in range(n)]

  @functools.partial(jax.shard_map, in_specs=(P(axes), P(axes), P(), P()), out_specs=P(),
                     check_vma=False)
  def ring(image, text, t, b):
    total = _pair_loss(image, text, t, b, True)

    def body(carry, _):
      chunk, acc = carry
      chunk = jax.lax.ppermute(chunk, axes, perm)
      return (chunk, acc + _pair_loss(image, chunk, t, b, False)), None

    (_, total), _ = jax.lax.scan(body, (text, total), None, length=n - 1)
    return jax.lax.psum(total, axes) / global_batch

  return ring(image_emb, text_emb, jnp.asarray(temperature, jnp.float32),
              jnp.asarray(bias, jnp.float32))
