"""Masked language modelling (DeCLIP's text self-supervision, TSS): BERT masking and the loss.

Masking runs inside the jitted step (a pure function of a PRNG key), so the host pipeline only
tokenises. Each non-special token is selected with probability 0.15; a selected token becomes the
mask id with probability 0.8, a random token with 0.1, and stays unchanged with 0.1. The loss is
the cross-entropy at selected positions only, averaged over all selected tokens of the global batch
(DeCLIP's `F.cross_entropy(logits[labels != -100], ...)`), not per sequence.

One deliberate difference from DeCLIP's code: random replacements are drawn from the ordinary
tokens [first_regular_id, vocab_size), never a special id, so a replacement can never become an
end-of-text token and move the text tower's pooling position.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def mask_tokens(rng: jax.Array, ids: jax.Array, *, mask_id: int, special_ids: Sequence[int],
                first_regular_id: int, vocab_size: int, probability: float = 0.15,
                mask_fraction: float = 0.8, random_fraction: float = 0.1
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BERT's 80/10/10 masking of int32 [B, L] ids.

  Returns:
    (masked_ids, targets, weights): the corrupted ids, the original ids, and 1.0 at the selected
    positions (0.0 elsewhere, including every special token and padding).
  """
  select_key, choice_key, random_key = jax.random.split(rng, 3)
  special = jnp.isin(ids, jnp.asarray(tuple(special_ids), ids.dtype))
  selected = jax.random.bernoulli(select_key, probability, ids.shape) & ~special
  u = jax.random.uniform(choice_key, ids.shape)
  to_mask = selected & (u < mask_fraction)
  to_random = selected & (u >= mask_fraction) & (u < mask_fraction + random_fraction)
  random_ids = jax.random.randint(random_key, ids.shape, first_regular_id, vocab_size, ids.dtype)
  masked = jnp.where(to_mask, jnp.asarray(mask_id, ids.dtype), jnp.where(to_random, random_ids, ids))
  return masked, ids, selected.astype(jnp.float32)


def mlm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over the positions where weights == 1 (0 when nothing is selected).

  Args:
    logits: [B, L, V] predictions at every position.
    targets: int [B, L] original token ids.
    weights: [B, L] 1.0 at the masked (selected) positions.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  count = jnp.sum(weights)
  loss = jnp.sum(nll * weights) / jnp.maximum(count, 1.0)
  correct = (jnp.argmax(logits, axis=-1) == targets) * weights
  return loss, {"mlm_acc": jnp.sum(correct) / jnp.maximum(count, 1.0), "mlm_tokens": count}
