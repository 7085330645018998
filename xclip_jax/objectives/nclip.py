"""nCLIP's non-contrastive objective (Zhou et al., CVPR 2023), as far as the paper is known.

No code was released and the paper's equations could not be read (../reference/xclip.md): this is
the documented reading. Each modality's head gives logits over K shared prototypes;
p_v = softmax(l_v / τ_v), p_t = softmax(l_t / τ_t), and

  align  = ½ [H(q_t, p_v) + H(q_v, p_t)]        each modality's distribution supervises the other
  sharp  = ½ [mean_i H(p_v^i) + mean_i H(p_t^i)]  minimised: confident assignments (anti-uniform)
  smooth = ½ [(log K − H(p̄_v)) + (log K − H(p̄_t))]  minimised: the global-batch mean spreads over
                                                    prototypes (MSN's ME-MAX; anti-one-prototype)
  L = align + w_sharp · sharp + w_smooth · smooth

Targets q are the other modality's distribution at temperature τ_target, under stop-gradient when
`stop_gradient_targets` (DINO/MSN style); the means p̄ are over the global batch (global arrays).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
  return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), axis=axis)


def nclip_loss(image_logits: jax.Array, text_logits: jax.Array, *, image_temp: float,
               text_temp: float, target_temp: float, stop_gradient_targets: bool,
               sharp_weight: float, smooth_weight: float
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss and its terms plus collapse metrics (entropies in nats, prototypes in use)."""
  image_logits = image_logits.astype(jnp.float32)
  text_logits = text_logits.astype(jnp.float32)
  num_prototypes = image_logits.shape[-1]
  log_p_v = jax.nn.log_softmax(image_logits / image_temp, axis=-1)
  log_p_t = jax.nn.log_softmax(text_logits / text_temp, axis=-1)
  p_v, p_t = jnp.exp(log_p_v), jnp.exp(log_p_t)

  q_v = jax.nn.softmax(image_logits / target_temp, axis=-1)
  q_t = jax.nn.softmax(text_logits / target_temp, axis=-1)
  if stop_gradient_targets:
    q_v, q_t = jax.lax.stop_gradient(q_v), jax.lax.stop_gradient(q_t)
  align = 0.5 * (jnp.mean(-jnp.sum(q_t * log_p_v, -1)) + jnp.mean(-jnp.sum(q_v * log_p_t, -1)))

  sample_entropy = 0.5 * (jnp.mean(entropy(p_v)) + jnp.mean(entropy(p_t)))
  mean_entropy = 0.5 * (entropy(jnp.mean(p_v, 0)) + entropy(jnp.mean(p_t, 0)))
  smooth = jnp.log(num_prototypes) - mean_entropy
  loss = align + sharp_weight * sample_entropy + smooth_weight * smooth

  in_use = jnp.zeros(num_prototypes).at[jnp.argmax(image_logits, -1)].set(1.0)
  in_use = in_use.at[jnp.argmax(text_logits, -1)].set(1.0)
  return loss, {"nclip_align": align, "nclip_sample_entropy": sample_entropy,
                "nclip_mean_entropy": mean_entropy, "nclip_prototypes_used": jnp.sum(in_use),
                "nclip_agreement": jnp.mean(jnp.argmax(image_logits, -1) ==
                                            jnp.argmax(text_logits, -1))}
