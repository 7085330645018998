"""CLIP's text transformer: token + position embeddings -> causal pre-LN blocks -> ln_final, pooled
at the first end-of-text token."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from xclip_jax.models import transformer

PAD_ID = 0  # the tokenizer's padding id (SentencePiece pad_id=0)


def pool_positions(ids: jax.Array, eos_id: int) -> jax.Array:
  """[B] index of each row's first `eos_id`; rows without one use their last non-pad position."""
  is_eos = ids == eos_id
  first_eos = jnp.argmax(is_eos, axis=-1)
  positions = jnp.arange(ids.shape[-1])
  # Truncated captions lose their end token; the last real token is the best summary left.
  last_token = jnp.max(jnp.where(ids != PAD_ID, positions, 0), axis=-1)
  return jnp.where(jnp.any(is_eos, axis=-1), first_eos, last_token)


class TextTransformer(nnx.Module):
  """Text tower; `text_cfg` is config.model.text (context_length, width, layers, heads, mlp_ratio,
  vocab_size, causal).

  Returns dict(embed=[B, embed_dim] projected, not normalised; pooled=[B, width] at the pooling
  position; tokens=[B, L, width] ln_final outputs of every position).
  """

  @transformer.mesh_optional
  def __init__(self, text_cfg: Mapping[str, Any], *, embed_dim: int, eos_id: int,
               dtype: Any = "float32", remat: str = "none", activation: str = "quick_gelu",
               rngs: nnx.Rngs):
    self.dtype = transformer.compute_dtype(dtype)
    self.eos_id = int(eos_id)
    self.context_length = int(text_cfg["context_length"])
    width = int(text_cfg["width"])
    causal = bool(text_cfg.get("causal", True))

    # Embedding stds follow OpenAI CLIP's initialize_parameters.
    self.token_embedding = transformer.normal_param(
        rngs, 0.02, (int(text_cfg["vocab_size"]), width), ("vocab", "embed"))
    self.pos_embedding = transformer.normal_param(
        rngs, 0.01, (self.context_length, width), ("position", "embed"))
    self.transformer = transformer.ScannedBlocks(
        layers=int(text_cfg["layers"]), width=width, heads=int(text_cfg["heads"]),
        mlp_ratio=float(text_cfg["mlp_ratio"]), causal=causal, activation=activation,
        dtype=self.dtype, remat=remat, rngs=rngs)
    self.ln_final = transformer.layer_norm(width, dtype=self.dtype, rngs=rngs)
    self.projection = transformer.normal_param(rngs, width**-0.5, (width, embed_dim),
                                               ("embed", "joint"))

  def __call__(self, ids: jax.Array) -> dict[str, jax.Array]:
    if ids.ndim != 2 or ids.shape[1] > self.context_length:
      raise ValueError(f"ids must be [B, L] with L <= {self.context_length}, got {ids.shape}.")
    dt = self.dtype
    length = ids.shape[1]
    x = jnp.take(self.token_embedding[...], ids, axis=0).astype(dt)
    x = x + self.pos_embedding[:length].astype(dt)
    tokens = self.ln_final(self.transformer(x))
    pool_at = pool_positions(ids, self.eos_id)
    pooled = jnp.take_along_axis(tokens, pool_at[:, None, None], axis=1)[:, 0]
    embed = pooled @ self.projection[...].astype(dt)
    return dict(embed=embed, pooled=pooled, tokens=tokens)
