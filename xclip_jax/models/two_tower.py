"""The image-text model every method shares: a ViT, a text transformer and a learnable logit scale.

Method-specific heads (DeCLIP's SimSiam projector/predictor and MLM head, nCLIP's prototypes) live
in models/heads.py and read this model's outputs (`image_pooled`, `text_tokens`), so the towers
stay the same for every method.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from xclip_jax.models import text as text_lib
from xclip_jax.models import transformer
from xclip_jax.models import vit as vit_lib


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / ||x|| along the last axis, computed in float32 (bf16 norms are too coarse)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


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

  def encode_image(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> L2-normalised float32 [B, embed_dim]."""
    return l2_normalize(self.image(images)["embed"])

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """int32 [B, L] -> L2-normalised float32 [B, embed_dim]."""
    return l2_normalize(self.text(ids)["embed"])

  def scale(self) -> jax.Array:
    """exp(logit_scale), clamped at logit_scale_max as in CLIP (the clamp also stops its grad)."""
    return jnp.minimum(jnp.exp(self.logit_scale[...]), self.logit_scale_max)

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


def build_model(config: ml_collections.ConfigDict, *, eos_id: int, seed: int) -> TwoTower:
  """The model config.method needs (towers + that method's heads), initialised from `seed`."""
  rngs = nnx.Rngs(seed)
  if config.method == "declip":
    from xclip_jax.models import declip  # local: these build on this module
    return declip.DeclipModel(config.model, config.declip, eos_id=eos_id, rngs=rngs)
  if config.method in ("nclip", "xclip"):
    from xclip_jax.models import nclip
    return nclip.NclipModel(config.model, config.nclip, eos_id=eos_id, rngs=rngs)
  if config.method == "siglip":
    from xclip_jax.models import siglip
    return siglip.SiglipModel(config.model, config.siglip, eos_id=eos_id, rngs=rngs)
  if config.method == "slip":
    from xclip_jax.models import slip
    return slip.SlipModel(config.model, config.slip, eos_id=eos_id, rngs=rngs)
  return TwoTower(config.model, eos_id=eos_id, rngs=nnx.Rngs(seed))
