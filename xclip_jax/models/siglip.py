"""SigLIP model: the CLIP towers with a learnable temperature t = exp(t') and bias b."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from xclip_jax.models import transformer
from xclip_jax.models.two_tower import TwoTower


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
