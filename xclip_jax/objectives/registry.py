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

from xclip_jax.objectives import clip, clip_chunked, declip, mlm, nns

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
  image_views: int = 1                            # augmented views per image the data must give
  text_views: int = 1                             # 2: the caption and its EDA variant
  accumulable: bool = False                       # the loss needs only embeddings + scale


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


METHODS: dict[str, Method] = {
    "clip": Method("clip", _clip_objective, accumulable=True),
    "declip": Method("declip", _declip_objective, prepare=_declip_prepare,
                     init_state=_declip_state,
                     state_specs=lambda config: {"queue": ROWS, "ptr": P()},
                     image_views=2, text_views=2),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}; registered: {sorted(METHODS)}.")
  return METHODS[name]
