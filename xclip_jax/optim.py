"""The optimiser: optax AdamW with a linear-warmup + cosine schedule, a weight-decay mask, clipping."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr`, then cosine decay to `optim.min_lr` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
      decay_steps=total_steps, end_value=optim.min_lr)


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def weight_decay_mask(params: Any, no_decay: tuple[str, ...]) -> Any:
  """True where weight decay applies: every parameter except those whose path names a no-decay key.

  With no_decay=("bias", "scale", ...), 'qkv_bias' and 'logit_scale' are excluded too.

  Names, not ndim, decide: scanned layers stack LayerNorm scales into 2-D arrays, so CLIP's usual
  `ndim < 2` rule would decay them.
  """
  def decays(path) -> bool:
    # A name matches a key equal to it or ending in '_<name>' (e.g. 'qkv_bias' for 'bias').
    return not any(key == name or key.endswith("_" + name)
                   for key in _path_names(path) for name in no_decay)
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> tuple[optax.GradientTransformation,
                                                                              optax.Schedule]:
  """Returns (tx, schedule). `params` is only used to build the decay mask's tree structure."""
  optim = config.optim
  schedule = learning_rate_schedule(optim, config.total_steps)
  parts = []
  if optim.grad_clip_norm and optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  parts.append(optax.adamw(
      learning_rate=schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
      weight_decay=optim.weight_decay, mask=weight_decay_mask(params, tuple(optim.no_decay))))
  return optax.chain(*parts), schedule
