"""xCLIP: CLIP and nCLIP trained together on shared towers and nCLIP's heads,
total = nclip.clip_weight * CLIP + nclip.nclip_weight * nCLIP; scored in both spaces."""

from __future__ import annotations

from xclip_jax.methods import base
from xclip_jax.methods import nclip


def objective(outputs, batch, config, method_state):
  del batch
  nclip_value, metrics = nclip.nclip_terms(outputs, config)
  pair_loss, _ = base.contrastive(config)
  clip_value, clip_metrics = pair_loss(outputs["image_emb"], outputs["text_emb"],
                                       outputs["logit_scale"])
  loss = config.nclip.clip_weight * clip_value + config.nclip.nclip_weight * nclip_value
  return loss, {"clip_loss": clip_value, "nclip_loss": nclip_value,
                "logit_scale": outputs["logit_scale"], **clip_metrics, **metrics}, method_state


# The nCLIP model (its prototype heads on the shared towers), read by both losses.
METHOD = base.Method("xclip", nclip.model, objective, section="nclip", defaults=nclip.defaults,
                     constrain_params=base.clamp_logit_scale, options=(base.CHUNKED,),
                     scoring_spaces=("clip", "prototypes"))
