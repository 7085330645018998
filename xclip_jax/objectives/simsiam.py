"""SimSiam (Chen & He 2021) as DeCLIP uses it for image self-supervision (ISS).

Two views' projections z1, z2 and predictions p1, p2; each prediction is pulled toward the other
view's projection, which is a constant target (stop-gradient): the gradient reaches the encoder only
through the predictor branch. Without the stop-gradient the loss has a trivial collapsed minimum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def negative_cosine(p: jax.Array, z: jax.Array, eps: float = 1e-12) -> jax.Array:
  """−mean_i cos(p_i, sg(z_i)) over the rows of [B, D] arrays, in float32."""
  p = p.astype(jnp.float32)
  z = jax.lax.stop_gradient(z.astype(jnp.float32))
  p = p * jax.lax.rsqrt(jnp.maximum(jnp.sum(p * p, -1, keepdims=True), eps))
  z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True), eps))
  return -jnp.mean(jnp.sum(p * z, axis=-1))


def simsiam_loss(p1: jax.Array, z1: jax.Array, p2: jax.Array, z2: jax.Array) -> jax.Array:
  """−½ [cos(p1, sg(z2)) + cos(p2, sg(z1))], averaged over the global batch; in [−1, 1]."""
  return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
