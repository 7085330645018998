"""Method registry: a method name -> what the model must output and how those outputs become a loss.

The train loop asks the registry, never a method by name, so adding DeCLIP or nCLIP is a new entry
here plus pure objective functions; `train.py` does not change. An objective function receives the
model's output dict (global arrays), the batch and the config, and returns (loss, metrics).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from xclip_jax.objectives import clip

Metrics = dict[str, jax.Array]
ObjectiveFn = Callable[[dict[str, jax.Array], dict[str, jax.Array], Any], tuple[jax.Array, Metrics]]


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  outputs: tuple[str, ...]      # keys the model's forward pass must provide
  objective: ObjectiveFn


def _clip_objective(outputs, batch, config):
  del batch, config
  loss, metrics = clip.clip_loss(outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"])
  return loss, {"clip_loss": loss, **metrics}


METHODS: dict[str, Method] = {
    "clip": Method("clip", ("image_emb", "text_emb", "logit_scale"), _clip_objective),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}; registered: {sorted(METHODS)}.")
  return METHODS[name]
