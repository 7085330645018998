"""SLIP (Mu et al., ECCV 2022): CLIP on a lightly cropped view plus SimCLR's NT-Xent on two
MoCo-style views of the same image, through a projection head on the ViT's class token."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
from flax import nnx

from xclip_jax.data import views as views_lib
from xclip_jax.methods import base
from xclip_jax.models import heads, transformer
from xclip_jax.models.two_tower import TwoTower, interleave, split_views
from xclip_jax.objectives import simclr


def defaults() -> ml_collections.ConfigDict:
  """config.slip: the SimCLR term's weight and temperature, its head's sizes."""
  return ml_collections.ConfigDict(dict(ssl_weight=1.0, ssl_temperature=0.1, mlp_dim=4096,
                                        embed_dim=256))


class SlipModel(TwoTower):
  """The CLIP towers plus SimCLR's projection head on the image tower's pooled feature (SLIP
  puts it on the ViT's class token, not on the CLIP embedding). The batch carries the CLIP view
  `image` and two self-supervised views `image2`, `image3`; the SSL views go through the image
  tower together, interleaved."""

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
      pooled1, pooled2 = split_views(
          self.image(interleave(batch["image2"], batch["image3"]),
                     patch_keys=self.image.patch_keys(batch, train=train, views=(1, 2)))["pooled"])
      # One head call per view, as SLIP's forward: BatchNorm statistics per view.
      out["ssl_z1"] = self.ssl_head(pooled1, train=train)
      out["ssl_z2"] = self.ssl_head(pooled2, train=train)
    return out


def model(config, *, eos_id: int, rngs: nnx.Rngs) -> SlipModel:
  return SlipModel(config.model, config.slip, eos_id=eos_id, rngs=rngs)


def objective(outputs, batch, config, method_state):
  del batch
  pair_loss, _ = base.contrastive(config)
  clip_value, metrics = pair_loss(outputs["image_emb"], outputs["text_emb"],
                                  outputs["logit_scale"])
  ssl_value, ssl_metrics = simclr.nt_xent_loss(outputs["ssl_z1"], outputs["ssl_z2"],
                                               config.slip.ssl_temperature)
  loss = clip_value + config.slip.ssl_weight * ssl_value
  return loss, {"clip_loss": clip_value, "ssl_loss": ssl_value,
                "logit_scale": outputs["logit_scale"], **metrics, **ssl_metrics}, method_state


# The CLIP view is a plain crop (no flip, no colour); the SimCLR views are MoCo-style.
VIEWS = views_lib.Views(
    image=(views_lib.ImageView("image", crop="clip", augment="clip", flip=False),
           views_lib.ImageView("image2", crop="ssl", augment="moco"),
           views_lib.ImageView("image3", crop="ssl", augment="moco")),
    text=(views_lib.TextView("text"),))

METHOD = base.Method("slip", model, objective, views=VIEWS, section="slip", defaults=defaults,
                     constrain_params=base.clamp_logit_scale, options=(base.CHUNKED,))
