"""Method registry: a method name -> what its step needs and how model outputs become a loss.

The train loop asks the registry, never a method by name, so adding a method is a new entry here
plus pure objective functions; `train.py` does not change. Per method:
  prepare(batch, rng, config, text_spec) -> batch   on-device input work inside the jitted step
                                                   (DeCLIP: MLM masking of the caption)
  objective(outputs, batch, config, method_state) -> (loss, metrics, new_method_state)
  init_state(config, rng) -> pytree                 extra train state (DeCLIP: the NNS queue),
  state_specs(config) -> PartitionSpecs              sharded as these specs say
`text_spec` holds the tokenizer's facts: vocab_size, pad_id, eos_id, mask_id, first_regular_id.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec as P

from xclip_jax.data import views as views_lib
from xclip_jax.objectives import clip, clip_chunked, declip, mlm, nclip, nns, siglip, simclr

Metrics = dict[str, jax.Array]
ROWS = P(("data", "fsdp", "tensor"), None)        # a [N, D] array split by rows over every device


def _no_state(config, rng):
  del config, rng
  return {}


def _no_prepare(batch, rng, config, text_spec):
  del rng, config, text_spec
  return batch


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  objective: Callable[..., tuple[jax.Array, Metrics, Any]]
  prepare: Callable[..., dict[str, jax.Array]] = _no_prepare
  init_state: Callable[[Any, jax.Array], Any] = _no_state
  state_specs: Callable[[Any], Any] = lambda config: {}
  views: views_lib.Views = views_lib.SINGLE      # what the input pipeline must give (data/views.py)
  accumulable: bool = False                       # the loss needs only embeddings + scale

  # Counts for code that has not moved to the declared views yet.
  @property
  def image_views(self) -> int:
    return len(self.views.image)

  @property
  def text_views(self) -> int:
    return len(self.views.text)


# ---- CLIP ----------------------------------------------------------------------------------------

def _clip_objective(outputs, batch, config, method_state):
  del batch
  if config.contrastive.impl == "chunked":
    loss, metrics = clip_chunked.clip_loss_chunked(
        outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"],
        chunk=config.contrastive.chunk)
  else:
    loss, metrics = clip.clip_loss(outputs["image_emb"], outputs["text_emb"],
                                   outputs["logit_scale"])
  return loss, {"clip_loss": loss, **metrics}, method_state


# ---- DeCLIP --------------------------------------------------------------------------------------

def _declip_prepare(batch, rng, config, text_spec):
  """Masks the caption for MLM; its unmasked ids become the MLM targets."""
  masked, targets, weights = mlm.mask_tokens(
      rng, batch["text"], mask_id=text_spec["mask_id"],
      special_ids=(text_spec["pad_id"], text_spec["eos_id"], text_spec["mask_id"]),
      first_regular_id=text_spec["first_regular_id"], vocab_size=text_spec["vocab_size"],
      probability=config.declip.mlm_probability)
  return dict(batch, text=masked, mlm_targets=targets, mlm_weights=weights)


def _declip_objective(outputs, batch, config, method_state):
  weights = {"clip_loss": config.declip.clip_weight, "simsiam_loss": config.declip.simsiam_weight,
             "mlm_loss": config.declip.mlm_weight, "nns_loss": config.declip.nns_weight}
  return declip.declip_loss(outputs, batch["mlm_targets"], batch["mlm_weights"], method_state,
                            weights)


def _declip_state(config, rng):
  return nns.init_queue(rng, config.declip.queue_size, config.model.embed_dim)


# ---- nCLIP / xCLIP -------------------------------------------------------------------------------

def _nclip_terms(outputs, config):
  c = config.nclip
  return nclip.nclip_loss(outputs["image_proto_logits"], outputs["text_proto_logits"],
                          image_temp=c.image_temp, text_temp=c.text_temp,
                          target_temp=c.target_temp, stop_gradient_targets=c.stop_gradient_targets,
                          sharp_weight=c.sharp_weight, smooth_weight=c.smooth_weight)


def _nclip_objective(outputs, batch, config, method_state):
  del batch
  loss, metrics = _nclip_terms(outputs, config)
  # CLIP's loss is logged (not trained) so that zero-shot behaviour can be followed.
  clip_value, _ = clip.clip_loss(jax.lax.stop_gradient(outputs["image_emb"]),
                                 jax.lax.stop_gradient(outputs["text_emb"]),
                                 jax.lax.stop_gradient(outputs["logit_scale"]))
  return loss, {"nclip_loss": loss, "clip_loss_untrained": clip_value, **metrics}, method_state


def _xclip_objective(outputs, batch, config, method_state):
  del batch
  nclip_value, metrics = _nclip_terms(outputs, config)
  clip_value, clip_metrics = clip.clip_loss(outputs["image_emb"], outputs["text_emb"],
                                            outputs["logit_scale"])
  loss = config.nclip.clip_weight * clip_value + config.nclip.nclip_weight * nclip_value
  return loss, {"clip_loss": clip_value, "nclip_loss": nclip_value, **clip_metrics,
                **metrics}, method_state


# ---- SigLIP, SLIP --------------------------------------------------------------------------------

def _siglip_objective(outputs, batch, config, method_state):
  del batch
  # The model's `scale()` is exp(t') clamped at logit_scale_max: SigLIP's temperature t.
  t, b = outputs["logit_scale"], outputs["logit_bias"]
  _, metrics = siglip.siglip_loss(jax.lax.stop_gradient(outputs["image_emb"]),
                                  jax.lax.stop_gradient(outputs["text_emb"]), t, b)
  if config.siglip.impl == "ring":
    loss = siglip.siglip_loss_ring(outputs["image_emb"], outputs["text_emb"], t, b)
  else:
    loss, _ = siglip.siglip_loss(outputs["image_emb"], outputs["text_emb"], t, b)
  return loss, {"siglip_loss": loss, "logit_bias": b, **metrics}, method_state


def _slip_objective(outputs, batch, config, method_state):
  del batch
  clip_value, metrics = clip.clip_loss(outputs["image_emb"], outputs["text_emb"],
                                       outputs["logit_scale"])
  ssl_value, ssl_metrics = simclr.nt_xent_loss(outputs["ssl_z1"], outputs["ssl_z2"],
                                               config.slip.ssl_temperature)
  loss = clip_value + config.slip.ssl_weight * ssl_value
  return loss, {"clip_loss": clip_value, "ssl_loss": ssl_value, **metrics, **ssl_metrics}, \
      method_state


METHODS: dict[str, Method] = {
    "clip": Method("clip", _clip_objective, accumulable=True),
    "declip": Method("declip", _declip_objective, prepare=_declip_prepare,
                     init_state=_declip_state,
                     state_specs=lambda config: {"queue": ROWS, "ptr": P()},
                     views=views_lib.Views(
                         image=(views_lib.ImageView("image", crop="ssl", augment="moco"),
                                views_lib.ImageView("image2", crop="ssl", augment="moco")),
                         text=(views_lib.TextView("text"), views_lib.TextView("text_aug", eda=True)))),
    "nclip": Method("nclip", _nclip_objective),
    "xclip": Method("xclip", _xclip_objective),
    "siglip": Method("siglip", _siglip_objective),
    # SLIP's CLIP view is a plain crop (no flip, no colour); its SimCLR views are MoCo-style.
    "slip": Method("slip", _slip_objective, views=views_lib.Views(
        image=(views_lib.ImageView("image", crop="clip", augment="clip", flip=False),
               views_lib.ImageView("image2", crop="ssl", augment="moco"),
               views_lib.ImageView("image3", crop="ssl", augment="moco")),
        text=(views_lib.TextView("text"),))),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}; registered: {sorted(METHODS)}.")
  return METHODS[name]
