"""Scoring spaces: how a model's image and text features become zero-shot and retrieval scores.

A method names the spaces it is scored in (`methods.Method.scoring_spaces`) and the model computes
each space's features (`model.image_features(images, spaces)`, `model.text_features(ids,
spaces)`); the evaluators only follow these definitions, so none of them names a method.

  clip        image: L2-normalised embedding; text: L2-normalised embedding.
              class = renormalised mean of its prompts' embeddings; score = cosine (dot product).
  prototypes  image: log p_v (nCLIP's prototype log-probabilities); text: q_t (its distribution
              over the same prototypes). class = mean of q_t over its prompts (a distribution);
              score = Σ_k q̄(k) log p_v(k), i.e. -H(q̄, p_v), the cross-entropy nCLIP's
              alignment term minimises for a matching pair. Retrieval ranks by the same score.

Both scores are dot products of an image feature and a text (or class) feature, so one matrix
product serves every space. Metric names: the method's first space reports under the evaluator's
plain names (`zeroshot/top1`, `retrieval/i2t_r1`, ...), which is what dashboards and the in-loop
log show; every further space under `<evaluator>/<space>/<metric>` (xCLIP:
`zeroshot/prototypes/top1`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _l2_normalise(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def clip_classes(prompt_features: jax.Array, num_classes: int) -> jax.Array:
  """[C*T, D] prompt embeddings (class-major) -> [C, D]: normalise, average over T, renormalise."""
  per_class = _l2_normalise(prompt_features).reshape(num_classes, -1, prompt_features.shape[-1])
  return _l2_normalise(per_class.mean(axis=1))


def prototype_classes(prompt_features: jax.Array, num_classes: int) -> jax.Array:
  """[C*T, K] prompt distributions (class-major) -> [C, K]: their mean over the T templates."""
  return prompt_features.reshape(num_classes, -1, prompt_features.shape[-1]).mean(axis=1)


CLASS_FEATURES: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "clip": clip_classes,
    "prototypes": prototype_classes,
}
# Spaces whose scores are cosines that training multiplies by the learned logit scale.
SCALED_BY_LOGIT_SCALE = ("clip",)


def check_spaces(spaces: tuple[str, ...]) -> tuple[str, ...]:
  unknown = [s for s in spaces if s not in CLASS_FEATURES]
  if unknown or not spaces:
    raise ValueError(f"Scoring spaces {list(spaces)}: each must be one of "
                     f"{sorted(CLASS_FEATURES)}.")
  return tuple(spaces)


def class_features(space: str, prompt_features: jax.Array, num_classes: int) -> jax.Array:
  """Per-class features of `space` from its prompts' features (class-major, T per class)."""
  return CLASS_FEATURES[check_spaces((space,))[0]](jnp.asarray(prompt_features), num_classes)


def scores(image_features: jax.Array, text_features: jax.Array) -> jax.Array:
  """[N, C] (or [N, M]) scores of every image against every class (or text), in float32."""
  return jnp.einsum("nd,cd->nc", image_features.astype(jnp.float32),
                    text_features.astype(jnp.float32))


def metric_name(evaluator: str, space: str, metric: str, spaces: tuple[str, ...]) -> str:
  """'<evaluator>/<metric>' for the primary (first) space, '<evaluator>/<space>/<metric>' else."""
  return f"{evaluator}/{metric}" if space == spaces[0] else f"{evaluator}/{space}/{metric}"
