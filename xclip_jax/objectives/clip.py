"""CLIP's symmetric InfoNCE, written over GLOBAL arrays.

The function is written as if the whole batch lived on one device. Under `jax.jit` with the
embeddings sharded over the batch axes, XLA partitions the B x B logits by rows, gathering the
other modality's embeddings; this is the same computation as open_clip's
`--local-loss --gather-with-grad`, with exact gradients through the gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def contrastive_logits(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array) -> jax.Array:
  """Scaled cosine logits [B_img, B_txt] in float32 (embeddings are expected L2-normalised)."""
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  return scale * jnp.einsum("id,td->it", image_emb, text_emb)


def _diagonal_nll(logits: jax.Array, axis: int) -> jax.Array:
  """Mean over i of -log softmax(logits, axis)[i, i]: cross-entropy with labels = arange(B)."""
  log_probs = jax.nn.log_softmax(logits, axis=axis)
  return -jnp.mean(jnp.diagonal(log_probs))


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE: ½ [CE(image -> text) + CE(text -> image)], positives on the diagonal.

  Args:
    image_emb: [B, D] L2-normalised image embeddings (global batch).
    text_emb: [B, D] L2-normalised text embeddings, row i paired with image i.
    scale: scalar multiplier of the cosine similarities (exp of the learnable logit scale).

  Returns:
    The scalar loss and metrics: each direction's loss and top-1 retrieval accuracy in the batch.
  """
  logits = contrastive_logits(image_emb, text_emb, scale)
  loss_i2t = _diagonal_nll(logits, axis=1)
  loss_t2i = _diagonal_nll(logits, axis=0)
  labels = jnp.arange(logits.shape[0])
  metrics = {
      "loss_i2t": loss_i2t,
      "loss_t2i": loss_t2i,
      "acc_i2t": jnp.mean(jnp.argmax(logits, axis=1) == labels),
      "acc_t2i": jnp.mean(jnp.argmax(logits, axis=0) == labels),
  }
  return 0.5 * (loss_i2t + loss_t2i), metrics
