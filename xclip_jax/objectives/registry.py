"""Method registry: a method name -> what its step needs and how model outputs become a loss.

The train loop asks the registry, never a method by name, so adding a method is a new entry here
plus pure objective functions; `train.py` does not change. Per method:
  prepare(batch, rng, config, text_spec) -> batch   on-device input work inside the jitted step
                                                   (DeCLIP: MLM masking of the caption)
  objective(outputs, batch, config, method_state) -> (loss, metrics, new_method_state)
  init_state(config, rng) -> pytree                 extra train state (DeCLIP: the NNS queue),
  state_specs(config) -> PartitionSpecs              sharded as these specs say
  constrain_params(params, config) -> params        applied after every optimizer update
                                                   (CLIP family: the logit-scale range)
  options                                           the method-specific config options it honours
                                                   (others left at their neutral value: an error
                                                   otherwise, see `check_options`)
  scoring_spaces, probe_space                       how evaluation scores its features
                                                   (evaluate/spaces.py)
`text_spec` holds the tokenizer's facts: vocab_size, pad_id, eos_id, mask_id, first_regular_id.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from xclip_jax.data import views as views_lib
from xclip_jax.objectives import clip, clip_chunked, declip, mlm, nclip, nns, siglip, simclr

Metrics = dict[str, jax.Array]
ROWS = P(("data", "fsdp", "tensor"), None)        # a [N, D] array split by rows over every device

# Method options: config path -> (neutral value, what to use instead when a method ignores it).
METHOD_OPTIONS = {
    "contrastive.impl": ("global", "SigLIP's memory-saving form is config.siglip.impl=ring."),
    "siglip.impl": ("global", "The CLIP family's is config.contrastive.impl=chunked."),
}


def _no_state(config, rng):
  del config, rng
  return {}


def _no_prepare(batch, rng, config, text_spec):
  del rng, config, text_spec
  return batch


def _unconstrained(params, config):
  del config
  return params


def logit_scale_range(config) -> tuple[float, float]:
  """The logit-scale parameter's range: config.model.logit_scale_range, or CLIP's
  [0, ln logit_scale_max] (OpenAI CLIP / open_clip / SLIP clamp to [0, ln 100] after each step)."""
  if tuple(config.model.logit_scale_range):
    low, high = config.model.logit_scale_range
    return float(low), float(high)
  return 0.0, math.log(float(config.model.logit_scale_max))


def _clamp_logit_scale(params, config):
  low, high = logit_scale_range(config)
  return dict(params, logit_scale=jnp.clip(params["logit_scale"], low, high))


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  objective: Callable[..., tuple[jax.Array, Metrics, Any]]
  prepare: Callable[..., dict[str, jax.Array]] = _no_prepare
  init_state: Callable[[Any, jax.Array], Any] = _no_state
  state_specs: Callable[[Any], Any] = lambda config: {}
  constrain_params: Callable[[Any, Any], Any] = _clamp_logit_scale
  views: views_lib.Views = views_lib.SINGLE      # what the input pipeline must give (data/views.py)
  accumulable: bool = False                       # the loss needs only embeddings + scale
  options: tuple[str, ...] = ("contrastive.impl",)
  # Evaluation: the spaces zero-shot and retrieval score in (the first is reported under the
  # evaluators' plain metric names) and the image features the linear probe reads.
  scoring_spaces: tuple[str, ...] = ("clip",)
  probe_space: str = "clip"


def check_options(config) -> None:
  """A method option set away from its neutral value that the method does not read is an error."""
  method = get_method(config.method)
  for option, (neutral, instead) in METHOD_OPTIONS.items():
    section, key = option.split(".")
    value = config[section][key]
    if value != neutral and option not in method.options:
      raise ValueError(f"config.{option}={value!r} has no effect on method {config.method!r} "
                       f"(it reads {', '.join(method.options) or 'no such option'}); leave it at "
                       f"{neutral!r}. {instead}")


def _contrastive(config) -> tuple[Callable[..., tuple[jax.Array, Metrics]],
                                  Callable[..., jax.Array]]:
  """(symmetric InfoNCE, its image -> text half) as config.contrastive.impl computes them."""
  if config.contrastive.impl == "chunked":
    chunk = int(config.contrastive.chunk)
    return (functools.partial(clip_chunked.clip_loss_chunked, chunk=chunk),
            functools.partial(clip_chunked.image_to_text_loss_chunked, chunk=chunk))
  return clip.clip_loss, nns.image_to_text_nce


# ---- CLIP ----------------------------------------------------------------------------------------

def _clip_objective(outputs, batch, config, method_state):
  del batch
  pair_loss, _ = _contrastive(config)
  loss, metrics = pair_loss(outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"])
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
  pair_loss, image_to_text = _contrastive(config)
  return declip.declip_loss(outputs, batch["mlm_targets"], batch["mlm_weights"], method_state,
                            weights, pair_loss=pair_loss, image_to_text=image_to_text)


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
  # CLIP's loss is logged (not trained) to show that nCLIP's CLIP head stays untrained.
  pair_loss, _ = _contrastive(config)
  clip_value, _ = pair_loss(jax.lax.stop_gradient(outputs["image_emb"]),
                            jax.lax.stop_gradient(outputs["text_emb"]),
                            jax.lax.stop_gradient(outputs["logit_scale"]))
  return loss, {"nclip_loss": loss, "clip_loss_untrained": clip_value, **metrics}, method_state


def _xclip_objective(outputs, batch, config, method_state):
  del batch
  nclip_value, metrics = _nclip_terms(outputs, config)
  pair_loss, _ = _contrastive(config)
  clip_value, clip_metrics = pair_loss(outputs["image_emb"], outputs["text_emb"],
                                       outputs["logit_scale"])
  loss = config.nclip.clip_weight * clip_value + config.nclip.nclip_weight * nclip_value
  return loss, {"clip_loss": clip_value, "nclip_loss": nclip_value, **clip_metrics,
                **metrics}, method_state


# ---- SigLIP, SLIP --------------------------------------------------------------------------------

def _siglip_objective(outputs, batch, config, method_state):
  del batch
  # The model's `scale()` is exp(t') (SigLIP's logit_scale_max is far out of reach): t.
  t, b = outputs["logit_scale"], outputs["logit_bias"]
  loss_fn = siglip.siglip_loss_ring if config.siglip.impl == "ring" else siglip.siglip_loss
  loss, metrics = loss_fn(outputs["image_emb"], outputs["text_emb"], t, b)
  return loss, {"siglip_loss": loss, "logit_bias": b, **metrics}, method_state


def _slip_objective(outputs, batch, config, method_state):
  del batch
  pair_loss, _ = _contrastive(config)
  clip_value, metrics = pair_loss(outputs["image_emb"], outputs["text_emb"],
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
    # nCLIP never trains its CLIP head: it is scored through its prototype distributions and
    # probed on the pooled image features. xCLIP trains both heads and reports both.
    "nclip": Method("nclip", _nclip_objective, scoring_spaces=("prototypes",),
                    probe_space="pooled"),
    "xclip": Method("xclip", _xclip_objective, scoring_spaces=("clip", "prototypes")),
    # SigLIP's temperature and bias are not clamped.
    "siglip": Method("siglip", _siglip_objective, constrain_params=_unconstrained,
                     options=("siglip.impl",)),
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
