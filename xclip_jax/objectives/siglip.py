"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), over the global batch and as a ring.

  L = -1/B Σ_i Σ_j log σ(z_ij (t · x_i·y_j + b)),   z_ij = 1 if i == j else -1

with a learnable temperature t = exp(t') (t' = log 10 at init) and bias b (-10 at init). Every
pair is an independent binary problem, so no softmax normalises over the batch.

`siglip_loss_ring` is the paper's memory-efficient form as an explicit `jax.shard_map`: each
device keeps its images and passes text chunks around the ring of devices with `ppermute`, adding
the loss of its images against each visiting chunk; only one [B/n, B/n] block exists at a time.
Its value and gradients equal `siglip_loss`. Its in-batch retrieval accuracies are computed inside
the ring too (each image's best negative so far stays on its device; each text's positive logit and
best negative so far travel with its chunk), so the B x B logits are never formed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from xclip_jax.parallel.mesh import BATCH_AXES


def _pair_loss(logits: jax.Array, positive: bool) -> jax.Array:
  """Sum over the block of -log σ(z · logits); z = +1 on the diagonal if `positive`, else -1.

  Written without a [b, b] label matrix: -log σ(l) = -log σ(-l) - l, so the diagonal's positives
  are the all-negative sum minus the diagonal logits."""
  total = -jnp.sum(jax.nn.log_sigmoid(-logits))
  if positive:
    total = total - jnp.sum(jnp.diagonal(logits))
  return total


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array,
                bias: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over images of the summed pairwise sigmoid losses (global arrays), and the in-batch
  top-1 retrieval accuracies (argmax over texts per image, over images per text)."""
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  logits = temperature * image_emb @ text_emb.T + bias
  loss = _pair_loss(logits, True) / image_emb.shape[0]
  logits = jax.lax.stop_gradient(logits)
  labels = jnp.arange(logits.shape[0])
  return loss, {"acc_i2t": jnp.mean(jnp.argmax(logits, 1) == labels),
                "acc_t2i": jnp.mean(jnp.argmax(logits, 0) == labels)}


def siglip_loss_ring(image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array,
                     bias: jax.Array, *, axes: tuple[str, ...] = BATCH_AXES
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`siglip_loss`'s value and metrics, computed on the current mesh (`jax.set_mesh`) by a ring of
  ppermutes of text chunks over the batch axes.

  An accuracy counts a row when its positive logit is strictly above every negative (an exact
  tie counts as wrong; argmax in `siglip_loss` would pick the lower index).
  """
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  global_batch = image_emb.shape[0]
  mesh = jax.sharding.get_abstract_mesh()
  n = 1
  for axis in axes:
    n *= mesh.shape[axis]
  # Device i sends its current chunk to device i - 1 (in the flattened order of `axes`).
  perm = [(i, (i - 1) % n) for i in range(n)]

  # Each block is rematerialised in the backward pass: the scan then keeps only the visiting
  # text chunk per step, not a [B/n, B/n] block of logits per step.
  @functools.partial(jax.checkpoint, static_argnums=(4,))
  def block(image, text, t, b, positive):
    """(loss sum, best logit per image, best logit per text, positive logits) of one block;
    for the positive block the bests exclude the diagonal, which is returned as the positives."""
    logits = t * image @ text.T + b
    seen = jax.lax.stop_gradient(logits)
    diagonal = jnp.diagonal(seen) if positive else None
    if positive:
      seen = jnp.where(jnp.eye(seen.shape[0], dtype=bool), -jnp.inf, seen)
    return _pair_loss(logits, positive), jnp.max(seen, axis=1), jnp.max(seen, axis=0), diagonal

  @functools.partial(jax.shard_map, in_specs=(P(axes), P(axes), P(), P()), out_specs=P(),
                     check_vma=False)
  def ring(image, text, t, b):
    total, image_best, text_best, positive = block(image, text, t, b, True)   # the home block
    # What travels with a text chunk: the chunk, its positive logits, its best negatives so far.
    travelling = (text, positive, text_best)

    def body(carry, _):
      (chunk, chunk_positive, chunk_best), image_best, total = carry
      chunk, chunk_positive, chunk_best = jax.lax.ppermute(
          (chunk, chunk_positive, chunk_best), axes, perm)
      loss, row_best, column_best, _ = block(image, chunk, t, b, False)
      carry = ((chunk, chunk_positive, jnp.maximum(chunk_best, column_best)),
               jnp.maximum(image_best, row_best), total + loss)
      return carry, None

    (travelling, image_best, total), _ = jax.lax.scan(
        body, (travelling, image_best, total), None, length=n - 1)
    _, chunk_positive, chunk_best = travelling    # every chunk has met every device's images
    correct_i2t = jnp.sum(positive > image_best).astype(jnp.float32)
    correct_t2i = jnp.sum(chunk_positive > chunk_best).astype(jnp.float32)
    return jax.lax.psum(jnp.stack([total, correct_i2t, correct_t2i]), axes) / global_batch

  loss, acc_i2t, acc_t2i = ring(image_emb, text_emb, jnp.asarray(temperature, jnp.float32),
                                jnp.asarray(bias, jnp.float32))
  return loss, {"acc_i2t": acc_i2t, "acc_t2i": acc_t2i}
