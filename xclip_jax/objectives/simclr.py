"""SimCLR's NT-Xent (Chen et al. 2020) over the global batch, as SLIP uses it for its image
self-supervision: two views' projections z1, z2 (L2-normalised), temperature 0.1, each view's
positive is the other view of the same image, and the 2B - 2 other embeddings are negatives
(the self-similarity is excluded)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nt_xent_loss(z1: jax.Array, z2: jax.Array, temperature: float = 0.1
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """½ [CE([z1·z2ᵀ | z1·z1ᵀ]) + CE([z2·z1ᵀ | z2·z2ᵀ])] / temperature, self-pairs masked."""
  normalise = lambda z: z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  z1, z2 = normalise(z1.astype(jnp.float32)), normalise(z2.astype(jnp.float32))
  n = z1.shape[0]
  self_mask = jnp.eye(n, dtype=bool)

  def one_side(a, b):
    ab = a @ b.T / temperature
    aa = jnp.where(self_mask, -1e9, a @ a.T / temperature)
    logits = jnp.concatenate([ab, aa], axis=1)                 # positives: diagonal of ab
    log_probs = jax.nn.log_softmax(logits, axis=1)
    return -jnp.mean(jnp.diagonal(log_probs[:, :n])), jnp.mean(jnp.argmax(logits, 1) ==
                                                                 jnp.arange(n))

  loss_a, acc_a = one_side(z1, z2)
  loss_b, acc_b = one_side(z2, z1)
  return 0.5 * (loss_a + loss_b), {"ssl_acc": 0.5 * (acc_a + acc_b)}
