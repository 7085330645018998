"""CLIP's ViT image encoder (Radford et al. 2021): patches -> [CLS] + positions -> pre-LN blocks."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from xclip_jax.models import transformer


class VisionTransformer(nnx.Module):
  """Image tower; `image_cfg` is config.model.image (image_size, patch_size, width, layers, heads,
  mlp_ratio).

  Returns dict(embed=[B, embed_dim] projected, not normalised; pooled=[B, width] ln_post of the
  class token; tokens=[B, 1 + num_patches, width] ln_post of every token, class token first).
  """

  @transformer.mesh_optional
  def __init__(self, image_cfg: Mapping[str, Any], *, embed_dim: int, dtype: Any = "float32",
               remat: str = "none", activation: str = "quick_gelu", rngs: nnx.Rngs):
    self.dtype = transformer.compute_dtype(dtype)
    self.image_size = int(image_cfg["image_size"])
    self.patch_size = patch = int(image_cfg["patch_size"])
    if self.image_size % patch:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={patch}.")
    width = int(image_cfg["width"])
    num_tokens = 1 + (self.image_size // patch)**2
    scale = width**-0.5

    # A stride-`patch` conv is a linear map of each flattened patch. CLIP leaves it at PyTorch's
    # default (fan-in scaled) init; lecun_normal is the same scale up to a constant.
    self.patch_embed = nnx.Conv(
        3, width, kernel_size=(patch, patch), strides=(patch, patch), padding="VALID",
        use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          ("patch", "patch", "patch", "embed")))
    self.class_embedding = transformer.normal_param(rngs, scale, (width,), ("embed",))
    self.pos_embedding = transformer.normal_param(rngs, scale, (num_tokens, width),
                                                  ("position", "embed"))
    self.ln_pre = transformer.layer_norm(width, dtype=self.dtype, rngs=rngs)
    self.transformer = transformer.ScannedBlocks(
        layers=int(image_cfg["layers"]), width=width, heads=int(image_cfg["heads"]),
        mlp_ratio=float(image_cfg["mlp_ratio"]), causal=False, activation=activation,
        dtype=self.dtype, remat=remat, rngs=rngs)
    self.ln_post = transformer.layer_norm(width, dtype=self.dtype, rngs=rngs)
    self.projection = transformer.normal_param(rngs, scale, (width, embed_dim), ("embed", "joint"))

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    if images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, 3], "
                       f"got {images.shape}.")
    dt = self.dtype
    x = self.patch_embed(images.astype(dt))                      # [B, h, w, width]
    x = x.reshape(x.shape[0], -1, x.shape[-1])                   # [B, h*w, width]
    cls = jnp.broadcast_to(self.class_embedding[...].astype(dt), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(dt)
    x = self.transformer(self.ln_pre(x))
    # LayerNorm is per token, so normalising all tokens and taking [CLS] equals CLIP's
    # ln_post(x[:, 0]); the normalised tokens are what dense heads want.
    tokens = self.ln_post(x)
    pooled = tokens[:, 0]
    embed = pooled @ self.projection[...].astype(dt)
    return dict(embed=embed, pooled=pooled, tokens=tokens)
