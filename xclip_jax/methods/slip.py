"""SLIP (Mu et al., ECCV 2022): CLIP on a lightly cropped view plus SimCLR's NT-Xent on two
MoCo-style views of the same image, through a projection head on the ViT's class token."""

from __future__ import annotations

from xclip_jax.data import views as views_lib
from xclip_jax.methods import base
from xclip_jax.objectives import simclr


def objective(outputs, batch, config, method_state):
  del batch
  pair_loss, _ = base.contrastive(config)
  clip_value, metrics = pair_loss(outputs["image_emb"], outputs["text_emb"],
                                  outputs["logit_scale"])
  ssl_value, ssl_metrics = simclr.nt_xent_loss(outputs["ssl_z1"], outputs["ssl_z2"],
                                               config.slip.ssl_temperature)
  loss = clip_value + config.slip.ssl_weight * ssl_value
  return loss, {"clip_loss": clip_value, "ssl_loss": ssl_value, **metrics, **ssl_metrics}, \
      method_state


# The CLIP view is a plain crop (no flip, no colour); the SimCLR views are MoCo-style.
VIEWS = views_lib.Views(
    image=(views_lib.ImageView("image", crop="clip", augment="clip", flip=False),
           views_lib.ImageView("image2", crop="ssl", augment="moco"),
           views_lib.ImageView("image3", crop="ssl", augment="moco")),
    text=(views_lib.TextView("text"),))

METHOD = base.Method("slip", objective, views=VIEWS, constrain_params=base.clamp_logit_scale,
                     options=(base.CHUNKED,))
