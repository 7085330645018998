"""SigLIP (Zhai et al., ICCV 2023): the pairwise sigmoid loss with a learnable temperature
t = exp(t') and bias b, neither clamped; config.siglip.impl=ring computes it as a shard_map ring."""

from __future__ import annotations

from xclip_jax.methods import base
from xclip_jax.objectives import siglip


def objective(outputs, batch, config, method_state):
  del batch
  # The model's `scale()` is exp(t') (SigLIP's logit_scale_max is far out of reach): t.
  t, b = outputs["logit_scale"], outputs["logit_bias"]
  loss_fn = siglip.siglip_loss_ring if config.siglip.impl == "ring" else siglip.siglip_loss
  loss, metrics = loss_fn(outputs["image_emb"], outputs["text_emb"], t, b)
  return loss, {"siglip_loss": loss, "logit_bias": b, **metrics}, method_state


RING = base.Option("siglip.impl", "global",
                   "SigLIP's memory-saving form is config.siglip.impl=ring.")

METHOD = base.Method("siglip", objective, options=(RING,))
