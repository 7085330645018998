"""SigLIP (Zhai et al., ICCV 2023): the pairwise sigmoid loss with a learnable temperature
t = exp(t') and bias b, neither clamped; config.siglip.impl=ring computes it as a shard_map ring."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from xclip_jax.methods import base
from xclip_jax.models import transformer
from xclip_jax.models.two_tower import TwoTower
from xclip_jax.objectives import siglip


IMPLS = ("global", "ring")


def defaults() -> ml_collections.ConfigDict:
  """config.siglip: t' and b at init, and how the loss is computed."""
  return ml_collections.ConfigDict(dict(
      temperature_init=math.log(10.0), bias_init=-10.0,
      impl="global"))                      # global | ring (shard_map ppermute of text chunks)


def check_config(config) -> None:
  if config.siglip.impl not in IMPLS:
    raise ValueError(f"config.siglip.impl={config.siglip.impl!r}: use global or ring.")


class SiglipModel(TwoTower):
  """`logit_scale` holds t' (init config.siglip.temperature_init = log 10); `logit_bias` holds b."""

  @transformer.mesh_optional
  def __init__(self, model_cfg: Mapping[str, Any], siglip_cfg: Mapping[str, Any], *, eos_id: int,
               rngs: nnx.Rngs):
    super().__init__(model_cfg, eos_id=eos_id, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(siglip_cfg["temperature_init"], jnp.float32))
    self.logit_bias = nnx.Param(jnp.asarray(siglip_cfg["bias_init"], jnp.float32))

  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = True
               ) -> dict[str, jax.Array]:
    out = super().__call__(batch, train=train)
    out["logit_bias"] = self.logit_bias[...]
    return out


def model(config, *, eos_id: int, rngs: nnx.Rngs) -> SiglipModel:
  return SiglipModel(config.model, config.siglip, eos_id=eos_id, rngs=rngs)


def objective(outputs, batch, config, method_state):
  del batch
  # The model's `scale()` is exp(t') (SigLIP's logit_scale_max is far out of reach): t.
  t, b = outputs["logit_scale"], outputs["logit_bias"]
  loss_fn = siglip.siglip_loss_ring if config.siglip.impl == "ring" else siglip.siglip_loss
  loss, metrics = loss_fn(outputs["image_emb"], outputs["text_emb"], t, b)
  return loss, {"siglip_loss": loss, "logit_scale": t, "logit_bias": b, **metrics}, method_state


RING = base.Option("siglip.impl", "global",
                   "SigLIP's memory-saving form is config.siglip.impl=ring.")

METHOD = base.Method("siglip", model, objective, section="siglip", defaults=defaults,
                     check_config=check_config, options=(RING,))
