"""CLIP's ViT image encoder (Radford et al. 2021): patches -> [CLS] + positions -> pre-LN blocks.

Patch dropout (FLIP, Li et al. 2023): with `image_cfg["patch_dropout"]` = p > 0, a training
forward keeps a uniformly random subset of round((1 - p) N) of the N patch tokens of each image,
chosen after the position embeddings are added (as FLIP and open_clip's PatchDropout do), never
the class token, so the blocks run on 1 + round((1 - p) N) tokens. The subset is a function of a
per-example key that the train step puts in the batch (PATCH_KEYS, from config.seed, the step
and the global row: deterministic, resumable, the same on any mesh); gradient accumulation splits
those keys with the rows, so both of its passes drop the same tokens. Without keys (evaluation,
`encode_image`) every token is kept. The number kept is static, so shapes stay static under jit,
and each row gathers from its own tokens: no data moves between devices.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from xclip_jax.models import transformer

# Batch entry with one PRNG key per example (raw uint32 key data [B, ...]) for patch dropout.
PATCH_KEYS = "patch_dropout_keys"
_PATCH_STREAM = 0x70617463     # "patc": separates these keys from other uses of config.seed


def num_kept_patches(num_patches: int, patch_dropout: float) -> int:
  """round((1 - p) N) patches kept; a ValueError when p is outside [0, 1) or nothing is kept."""
  if not 0.0 <= patch_dropout < 1.0:
    raise ValueError(f"config.model.image.patch_dropout={patch_dropout} must be in [0, 1).")
  kept = int(round((1.0 - patch_dropout) * num_patches))
  if kept < 1:
    raise ValueError(f"config.model.image.patch_dropout={patch_dropout} keeps no patch of "
                     f"{num_patches}: lower it.")
  return kept


def example_patch_keys(seed: int, step: jax.Array, batch_size: int) -> jax.Array:
  """Key data [batch_size, ...]: row r's key at `step` is fold_in(fold_in(fold_in(key(seed),
  stream), step), r), so it depends on the global row, not on the device holding it."""
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _PATCH_STREAM), step)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(batch_size))
  return jax.random.key_data(keys)


def add_patch_keys(batch: Mapping[str, jax.Array], config: Any, step: jax.Array
                   ) -> dict[str, jax.Array]:
  """The batch with PATCH_KEYS added when config.model.image.patch_dropout > 0 (the train step
  calls this; unchanged otherwise)."""
  if not config.model.image.get("patch_dropout", 0.0):
    return dict(batch)
  return dict(batch, **{PATCH_KEYS: example_patch_keys(int(config.seed), step,
                                                       batch["image"].shape[0])})


def kept_patch_indices(keys: jax.Array, num_patches: int, num_keep: int) -> jax.Array:
  """int32 [B, num_keep]: each row's kept patches, a uniformly random subset of
  range(num_patches) drawn from that row's key (key data [B, ...]), in increasing order."""
  def one(key):
    return jnp.sort(jax.random.choice(key, num_patches, (num_keep,), replace=False))
  return jax.vmap(one)(jax.random.wrap_key_data(keys)).astype(jnp.int32)


def drop_patches(tokens: jax.Array, keys: jax.Array, num_keep: int) -> jax.Array:
  """[B, 1 + N, W] (class token first) -> [B, 1 + num_keep, W]: the class token and each row's
  kept patches (kept_patch_indices)."""
  patches = tokens[:, 1:]
  index = kept_patch_indices(keys, patches.shape[1], num_keep)
  kept = jnp.take_along_axis(patches, index[:, :, None], axis=1)
  return jnp.concatenate([tokens[:, :1], kept], axis=1)


class VisionTransformer(nnx.Module):
  """Image tower; `image_cfg` is config.model.image (image_size, patch_size, width, layers, heads,
  mlp_ratio, patch_dropout).

  Returns dict(embed=[B, embed_dim] projected, not normalised; pooled=[B, width] ln_post of the
  class token; tokens=[B, 1 + num_patches, width] ln_post of every token, class token first; with
  patch dropout, of the class token and the kept patches).
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
    num_patches = (self.image_size // patch)**2
    num_tokens = 1 + num_patches
    self.patch_dropout = float(image_cfg.get("patch_dropout", 0.0))
    self.kept_patches = num_kept_patches(num_patches, self.patch_dropout)
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

  def patch_keys(self, batch: Mapping[str, jax.Array], *, train: bool,
                 views: tuple[int, ...] = (0,)) -> jax.Array | None:
    """Patch-dropout keys for a forward of the image views numbered `views` (their order in the
    method's declared views), interleaved row by row as the views' images are when several go
    through the tower at once; None (keep every token) outside training or with no dropout."""
    if not train or not self.patch_dropout:
      return None
    if PATCH_KEYS not in batch:
      raise ValueError(f"patch_dropout={self.patch_dropout} in training needs per-example keys "
                       f"in batch[{PATCH_KEYS!r}] (vit.add_patch_keys; the train step adds them).")
    keys = jax.random.wrap_key_data(batch[PATCH_KEYS])
    per_view = [jax.random.key_data(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, view))
                for view in views]
    stacked = jnp.stack(per_view, axis=1)                      # [B, views, ...]
    return stacked.reshape((-1,) + stacked.shape[2:])

  def __call__(self, images: jax.Array, *, patch_keys: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """`patch_keys` (from `patch_keys`, one per image) turns on patch dropout; None keeps all."""
    if images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, 3], "
                       f"got {images.shape}.")
    dt = self.dtype
    x = self.patch_embed(images.astype(dt))                      # [B, h, w, width]
    x = x.reshape(x.shape[0], -1, x.shape[-1])                   # [B, h*w, width]
    cls = jnp.broadcast_to(self.class_embedding[...].astype(dt), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(dt)
    if patch_keys is not None and self.kept_patches < x.shape[1] - 1:
      x = drop_patches(x, patch_keys, self.kept_patches)
    x = self.transformer(self.ln_pre(x))
    # LayerNorm is per token, so normalising all tokens and taking [CLS] equals CLIP's
    # ln_post(x[:, 0]); the normalised tokens are what dense heads want.
    tokens = self.ln_post(x)
    pooled = tokens[:, 0]
    embed = pooled @ self.projection[...].astype(dt)
    return dict(embed=embed, pooled=pooled, tokens=tokens)
