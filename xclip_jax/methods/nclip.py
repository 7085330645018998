"""nCLIP (Zhou et al., CVPR 2023): each modality's distribution over K shared prototypes
supervises the other's, with sharpness and smoothness regularisers. CLIP's loss is logged, not
trained, so nCLIP is scored through its prototypes (evaluate/spaces.py)."""

from __future__ import annotations

import jax

from xclip_jax.methods import base
from xclip_jax.objectives import nclip


def nclip_terms(outputs, config):
  """nCLIP's loss and metrics as config.nclip sets them (xCLIP adds CLIP's loss to them)."""
  c = config.nclip
  return nclip.nclip_loss(outputs["image_proto_logits"], outputs["text_proto_logits"],
                          image_temp=c.image_temp, text_temp=c.text_temp,
                          target_temp=c.target_temp, stop_gradient_targets=c.stop_gradient_targets,
                          sharp_weight=c.sharp_weight, smooth_weight=c.smooth_weight)


def objective(outputs, batch, config, method_state):
  del batch
  loss, metrics = nclip_terms(outputs, config)
  # CLIP's loss is logged (not trained) to show that nCLIP's CLIP head stays untrained.
  pair_loss, _ = base.contrastive(config)
  clip_value, _ = pair_loss(jax.lax.stop_gradient(outputs["image_emb"]),
                            jax.lax.stop_gradient(outputs["text_emb"]),
                            jax.lax.stop_gradient(outputs["logit_scale"]))
  return loss, {"nclip_loss": loss, "clip_loss_untrained": clip_value, **metrics}, method_state


# nCLIP never trains its CLIP head: it is scored through its prototype distributions and probed
# on the pooled image features.
METHOD = base.Method("nclip", objective, constrain_params=base.clamp_logit_scale,
                     options=(base.CHUNKED,), scoring_spaces=("prototypes",),
                     probe_space="pooled")
