"""CLIP (Radford et al. 2021): symmetric InfoNCE between the image and the text tower over the
global batch, with a learnable logit scale clamped to its range after every update."""

from __future__ import annotations

from xclip_jax.methods import base
from xclip_jax.models import two_tower


def model(config, *, eos_id: int, rngs):
  """The two towers and the logit scale, nothing else."""
  return two_tower.TwoTower(config.model, eos_id=eos_id, rngs=rngs)


def objective(outputs, batch, config, method_state):
  del batch
  pair_loss, _ = base.contrastive(config)
  loss, metrics = pair_loss(outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"])
  return loss, {"clip_loss": loss, "logit_scale": outputs["logit_scale"], **metrics}, method_state


METHOD = base.Method(
    "clip", model, objective, constrain_params=base.clamp_logit_scale, options=(base.CHUNKED,),
    # The loss reads per-example embeddings and the scale only: accumulation caches them.
    accumulation=base.Accumulation(features=("image_emb", "text_emb"), shared=("logit_scale",)))
