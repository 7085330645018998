"""The image-text model every method shares: a ViT, a text transformer and a learnable logit scale.

A method's model (xclip_jax/methods/) subclasses TwoTower and adds its heads (models/heads.py),
which read this model's outputs (`image_pooled`, `text_tokens`), so the towers stay the same for
every method. `interleave` / `split_views` run several views of a batch through one tower pass.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from xclip_jax.models import text as text_lib
from xclip_jax.models import transformer
from xclip_jax.models import vit as vit_lib


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / ||x|| along the last axis, computed in float32 (bf16 norms are too coarse)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
  """[B, ...] x 2 -> [2B, ...] with a's rows at even and b's rows at odd positions.

  Two views stacked this way go through a tower in one pass, and each device keeps its own
  samples' views (rows 2i and 2i+1 are sample i's): the stacking moves no data between devices.
  """
  return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def split_views(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inverse of `interleave`: [2B, ...] -> the even rows and the odd rows."""
  x = x.reshape((-1, 2) + x.shape[1:])
  return x[:, 0], x[:, 1]


class TwoTower(nnx.Module):
  """CLIP's dual encoder. `model_cfg` is config.model."""

  @transformer.mesh_optional
  def __init__(self, model_cfg: Mapping[str, Any], *, eos_id: int, rngs: nnx.Rngs):
    shared = dict(embed_dim=int(model_cfg["embed_dim"]), dtype=model_cfg["dtype"],
                  remat=model_cfg["remat"], activation=model_cfg["activation"], rngs=rngs)
    self.image = vit_lib.VisionTransformer(model_cfg["image"], **shared)
    self.text = text_lib.TextTransformer(model_cfg["text"], eos_id=eos_id, **shared)
    # A scalar: no logical names, so it is replicated on every mesh.
    self.logit_scale = nnx.Param(jnp.asarray(model_cfg["logit_scale_init"], jnp.float32))
    self.logit_scale_max = float(model_cfg["logit_scale_max"])

  # Feature spaces for evaluation: "clip" = the L2-normalised joint embeddings, "pooled" = the
  # towers' pooled features before the projection (image class token, text end-of-text token).
  # Heads add theirs (nCLIP: "prototypes"); evaluate/spaces.py says how each space is scored.
  feature_spaces: tuple[str, ...] = ("clip", "pooled")

  def _space(self, tower_out: dict[str, jax.Array], space: str, modality: str) -> jax.Array:
    """One feature space from a tower's outputs; `modality` is "image" or "text"."""
    del modality
    if space == "clip":
      return l2_normalize(tower_out["embed"])
    if space == "pooled":
      return tower_out["pooled"].astype(jnp.float32)
    raise ValueError(f"Feature space {space!r}: {type(self).__name__} has "
                     f"{', '.join(self.feature_spaces)}.")

  def image_features(self, images: jax.Array, spaces: tuple[str, ...] = ("clip",)
                     ) -> dict[str, jax.Array]:
    """[B, H, W, 3] -> {space: float32 [B, D_space]}, one pass of the image tower for all."""
    out = self.image(images)
    return {space: self._space(out, space, "image") for space in spaces}

  def text_features(self, ids: jax.Array, spaces: tuple[str, ...] = ("clip",)
                    ) -> dict[str, jax.Array]:
    """int32 [B, L] -> {space: float32 [B, D_space]}, one pass of the text tower for all."""
    out = self.text(ids)
    return {space: self._space(out, space, "text") for space in spaces}

  def encode_image(self, images: jax.Array, space: str = "clip") -> jax.Array:
    """[B, H, W, 3] -> float32 [B, D]; by default the L2-normalised joint embedding."""
    return self.image_features(images, (space,))[space]

  def encode_text(self, ids: jax.Array, space: str = "clip") -> jax.Array:
    """int32 [B, L] -> float32 [B, D]; by default the L2-normalised joint embedding."""
    return self.text_features(ids, (space,))[space]

  def scale(self) -> jax.Array:
    """exp(logit_scale) capped at logit_scale_max, as DeCLIP's forward clamps it through `.data`.

    The value is min(exp(s), max) and its derivative in s is that value everywhere, also at the
    cap: a plain `jnp.minimum` would zero the gradient for good once the cap is reached. Below the
    cap this is exp(s) exactly. The range of s itself is the method's parameter constraint
    (methods.Method.constrain_params, after every update): CLIP's [0, ln 100] keeps exp(s) at or
    below the cap, DeCLIP's YFCC recipe's [3, 6] reaches into it.
    """
    s = self.logit_scale[...]
    value = jax.lax.stop_gradient(jnp.minimum(jnp.exp(s), self.logit_scale_max))
    # s - sg(s) is exactly 0 in the forward pass, so the value is bitwise min(exp(s), max).
    return value + value * (s - jax.lax.stop_gradient(s))

  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = True
               ) -> dict[str, jax.Array]:
    """Both towers on batch["image"] / batch["text"].

    `train` turns on the image tower's patch dropout (config.model.image.patch_dropout; keys in
    batch[vit.PATCH_KEYS]); heads that behave differently in eval read it too.
    """
    image = self.image(batch["image"], patch_keys=self.image.patch_keys(batch, train=train))
    text = self.text(batch["text"])
    return dict(image_emb=l2_normalize(image["embed"]), text_emb=l2_normalize(text["embed"]),
                logit_scale=self.scale(), image_pooled=image["pooled"],
                text_pooled=text["pooled"], text_tokens=text["tokens"])
