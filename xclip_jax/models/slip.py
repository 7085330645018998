"""SLIP model: the CLIP towers plus SimCLR's projection head on the image tower's pooled feature
(SLIP puts it on the ViT's class token, not on the CLIP embedding). The batch carries the CLIP
view `image` and two self-supervised views `image2`, `image3`; the SSL views go through the image
tower together, interleaved so that no data moves between devices."""

from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx

from xclip_jax.models import heads, transformer
from xclip_jax.models.declip import interleave, split_views
from xclip_jax.models.two_tower import TwoTower


class SlipModel(TwoTower):

  @transformer.mesh_optional
  def __init__(self, model_cfg: Mapping[str, Any], slip_cfg: Mapping[str, Any], *, eos_id: int,
               rngs: nnx.Rngs):
    super().__init__(model_cfg, eos_id=eos_id, rngs=rngs)
    dtype = transformer.compute_dtype(model_cfg["dtype"])
    self.ssl_head = heads.SimCLRHead(int(model_cfg["image"]["width"]), int(slip_cfg["mlp_dim"]),
                                     int(slip_cfg["embed_dim"]), dtype=dtype, rngs=rngs)

  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = True
               ) -> dict[str, jax.Array]:
    out = super().__call__(batch, train=train)
    if "image2" in batch:
      pooled1, pooled2 = split_views(self.image(
          interleave(batch["image2"], batch["image3"]),
          patch_keys=self.image.patch_keys(batch, train=train, views=(1, 2)))["pooled"])
      # One head call per view, as SLIP's forward: BatchNorm statistics per view.
      out["ssl_z1"] = self.ssl_head(pooled1, train=train)
      out["ssl_z2"] = self.ssl_head(pooled2, train=train)
    return out
