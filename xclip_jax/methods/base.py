"""What a method is (`Method`), and the pieces several methods share.

A method module (methods/<name>.py) defines `METHOD = Method(...)`; the registry
(methods/__init__.py) finds it there. Its parts:
  model(config, eos_id=..., rngs=...) -> nnx.Module   the towers and this method's heads
  objective(outputs, batch, config, method_state) -> (loss, metrics, new_method_state)
                                                   the adapter from model outputs to the pure
                                                   objectives (xclip_jax/objectives/)
  views                                            what the input pipeline must give (data/views.py)
  section, defaults()                              its config section config.<section> and that
                                                   section's fields with their defaults (the schema,
                                                   config.base_config(), asks the registry for them)
  check_config(config)                             checks of its section's values, before compiling
  prepare(batch, rng, config, text_spec) -> batch  on-device input work inside the jitted step
                                                   (DeCLIP: MLM masking of the caption)
  init_state(config, rng) -> pytree                extra train state (DeCLIP: the NNS queue),
  state_specs(config) -> PartitionSpecs             sharded as these specs say
  constrain_params(params, config) -> params       applied after every optimizer update
                                                   (CLIP family: the logit-scale range)
  accumulation                                     what gradient accumulation caches (None: the
                                                   method's loss cannot be accumulated)
  options                                          the method-specific config options it honours
                                                   (others must stay at their neutral value)
  scoring_spaces, probe_space                      how evaluation scores its features
                                                   (evaluate/spaces.py)
`text_spec` is the tokenizer's data/text_spec.TextSpec (vocab size and special ids).
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
from xclip_jax.objectives import clip, clip_chunked, nns

Metrics = dict[str, jax.Array]
ROWS = P(("data", "fsdp", "tensor"), None)        # a [N, D] array split by rows over every device


@dataclasses.dataclass(frozen=True)
class Option:
  """A method-specific config option: `path` ("section.key"), the value that means "unused"
  (`neutral`), and what a method that honours it offers with it (told to a user who sets
  another method's option instead). Options compute the same loss and gradients another way
  (memory, layout), so a resumed run may change them (resume.py)."""
  path: str
  neutral: Any
  offer: str


@dataclasses.dataclass(frozen=True)
class Accumulation:
  """What gradient accumulation with cached features needs of a method (accumulate.py): the
  model outputs that are per-example features (rows of the batch, cached between passes) and
  the outputs that depend on the parameters only (the logit scale), which enter the loss
  directly. The method's loss must read nothing else of the outputs."""
  features: tuple[str, ...]
  shared: tuple[str, ...] = ()


def no_state(config, rng):
  del config, rng
  return {}


def no_prepare(batch, rng, config, text_spec):
  del rng, config, text_spec
  return batch


def no_check(config) -> None:
  del config


def unconstrained(params, config):
  del config
  return params


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  model: Callable[..., Any]            # (config, *, eos_id, rngs) -> the nnx model
  objective: Callable[..., tuple[jax.Array, Metrics, Any]]
  views: views_lib.Views = views_lib.SINGLE
  section: str = ""                    # config.<section> holds its fields ("": it has none)
  defaults: Callable[[], Any] | None = None          # -> ml_collections.ConfigDict of them
  check_config: Callable[[Any], None] = no_check
  prepare: Callable[..., dict[str, jax.Array]] = no_prepare
  init_state: Callable[[Any, jax.Array], Any] = no_state
  state_specs: Callable[[Any], Any] = lambda config: {}
  constrain_params: Callable[[Any, Any], Any] = unconstrained
  accumulation: Accumulation | None = None
  options: tuple[Option, ...] = ()
  # Evaluation: the spaces zero-shot and retrieval score in (the first is reported under the
  # evaluators' plain metric names) and the image features the linear probe reads.
  scoring_spaces: tuple[str, ...] = ("clip",)
  probe_space: str = "clip"


# ---- the CLIP family ----------------------------------------------------------------------------

CHUNKED = Option("contrastive.impl", "global",
                 "The CLIP family's memory-saving form is config.contrastive.impl=chunked.")


def logit_scale_range(config) -> tuple[float, float]:
  """The logit-scale parameter's range: config.model.logit_scale_range, or CLIP's
  [0, ln logit_scale_max] (OpenAI CLIP / open_clip / SLIP clamp to [0, ln 100] after each step)."""
  if tuple(config.model.logit_scale_range):
    low, high = config.model.logit_scale_range
    return float(low), float(high)
  return 0.0, math.log(float(config.model.logit_scale_max))


def clamp_logit_scale(params, config):
  """The CLIP family's parameter constraint: the logit-scale parameter kept in its range."""
  low, high = logit_scale_range(config)
  return dict(params, logit_scale=jnp.clip(params["logit_scale"], low, high))


def contrastive(config) -> tuple[Callable[..., tuple[jax.Array, Metrics]],
                                 Callable[..., jax.Array]]:
  """(symmetric InfoNCE, its image -> text half) as config.contrastive.impl computes them."""
  if config.contrastive.impl == "chunked":
    chunk = int(config.contrastive.chunk)
    return (functools.partial(clip_chunked.clip_loss_chunked, chunk=chunk),
            functools.partial(clip_chunked.image_to_text_loss_chunked, chunk=chunk))
  return clip.clip_loss, nns.image_to_text_nce
