"""The optimiser: optax AdamW with a learning-rate schedule, a weight-decay mask, clipping, a
weight-decay convention, frozen parameters and per-parameter learning-rate multipliers.

Weight-decay conventions (`config.optim.decay_convention`):
  adamw       optax.adamw / PyTorch AdamW: each step shrinks a decayed parameter by
              lr(t) x weight_decay (CLIP, SLIP, DeCLIP, open_clip).
  big_vision  big_vision's optax.make: decay is added after the learning-rate scaling, as
              weight_decay x schedule(t) with schedule(t) = lr(t) / lr (1 at the peak), so each step
              shrinks by weight_decay x lr(t) / lr (SigLIP). Written as AdamW with weight decay
              weight_decay / lr, which is the same update.

Frozen parameters and multipliers come from param_groups.py. Frozen ones get no update, no weight
decay, no optimizer state and do not count in gradient clipping: `optax.multi_transform` sends
them to `optax.set_to_zero()` and every other parameter through the optimiser chain. A multiplier
m scales the step as each convention's reference does:
  adamw       -lr(t) x m x (adam + wd x p): a PyTorch parameter group's lr scales its decay too
              (open_clip's groups, BEiT's layer decay)
  big_vision  -lr(t) x (m x adam + wd / lr x p): big_vision's lr_mults scale the gradient step
              before the decay is added, so decay stays weight_decay x lr(t) / lr
Clipping sees the gradients before any multiplier.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from xclip_jax import param_groups

DECAY_CONVENTIONS = ("adamw", "big_vision")


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """`optim.schedule`'s learning rate at each step, after a linear warmup from 0 to `optim.lr`.

  cosine             cosine decay to `optim.min_lr` at `total_steps` (optax's warmup_cosine_decay)
  constant           `optim.lr` after the warmup
  constant_cooldown  constant, then a linear cooldown to `min_lr` over the last cooldown steps
  rsqrt              big_vision's reciprocal square root, lr / sqrt(1 + (t - warmup) / timescale),
                     with an optional linear cooldown (Zhai et al. 2022, "Scaling ViT")

  A cooldown is big_vision's: it multiplies the schedule's own value by a factor going linearly
  from 1 at `total_steps - cooldown` to 0 at `total_steps` (with min_lr: min_lr + (lr(t) - min_lr)
  x factor), so rsqrt keeps decaying under it. The cooldown length is `optim.cooldown_steps`, or
  `optim.cooldown_fraction` of `total_steps`.
  """
  cooldown = check_schedule(optim, total_steps)
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
        decay_steps=total_steps, end_value=optim.min_lr)
  if optim.schedule == "rsqrt":
    timescale = float(optim.rsqrt_timescale)
    after_warmup = lambda t: optim.lr * jax.lax.rsqrt(1.0 + t / timescale)
  else:
    after_warmup = optax.constant_schedule(optim.lr)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, optim.lr, optim.warmup_steps), after_warmup],
      [optim.warmup_steps])
  if not cooldown:
    return schedule
  factor = optax.linear_schedule(1.0, 0.0, transition_steps=cooldown,
                                 transition_begin=total_steps - cooldown)
  end = optim.min_lr
  return lambda t: end + (schedule(t) - end) * factor(t)


SCHEDULES = ("cosine", "constant", "constant_cooldown", "rsqrt")


def cooldown_steps(optim: ml_collections.ConfigDict, total_steps: int) -> int:
  """The cooldown length: `optim.cooldown_steps`, or round(cooldown_fraction x total_steps)."""
  if optim.cooldown_steps:
    return int(optim.cooldown_steps)
  return int(round(float(optim.cooldown_fraction) * total_steps))


def check_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> int:
  """Raises a ValueError saying what to change for an invalid schedule; returns the cooldown."""
  name = optim.schedule
  if name not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={name!r}: use one of {', '.join(SCHEDULES)}.")
  if optim.cooldown_steps < 0 or not 0.0 <= optim.cooldown_fraction < 1.0:
    raise ValueError("config.optim.cooldown_steps must be >= 0 and config.optim.cooldown_fraction "
                     f"in [0, 1); got {optim.cooldown_steps} and {optim.cooldown_fraction}.")
  if optim.cooldown_steps and optim.cooldown_fraction:
    raise ValueError("Set config.optim.cooldown_steps or config.optim.cooldown_fraction, not both.")
  cooldown = cooldown_steps(optim, total_steps)
  if cooldown and name in ("cosine", "constant"):
    raise ValueError(f"config.optim.schedule={name} has no cooldown (cooldown_steps / "
                     "cooldown_fraction are set): use constant_cooldown or rsqrt.")
  if name == "constant_cooldown" and not cooldown:
    raise ValueError("config.optim.schedule=constant_cooldown needs config.optim.cooldown_steps "
                     "> 0 or config.optim.cooldown_fraction > 0.")
  if optim.warmup_steps + cooldown > total_steps:
    raise ValueError(f"config.optim.warmup_steps={optim.warmup_steps} + cooldown {cooldown} "
                     f"steps exceed config.total_steps={total_steps}: the cooldown would start "
                     "before the warmup ends. Shorten either.")
  if name == "rsqrt" and optim.rsqrt_timescale <= 0:
    raise ValueError(f"config.optim.rsqrt_timescale={optim.rsqrt_timescale} must be positive.")
  if optim.min_lr and name != "cosine" and not cooldown:
    raise ValueError(f"config.optim.min_lr={optim.min_lr} is the value a cosine or a cooldown "
                     f"ends at; schedule={name} without a cooldown never reaches it. Set "
                     "min_lr=0 or add a cooldown (cooldown_steps / cooldown_fraction).")
  return cooldown


def weight_decay_mask(params: Any, no_decay: tuple[str, ...]) -> Any:
  """True where weight decay applies: every parameter except those whose path names a no-decay key.

  With no_decay=("bias", "scale", ...), 'qkv_bias' and 'logit_scale' are excluded too.

  Names, not ndim, decide: scanned layers stack LayerNorm scales into 2-D arrays, so CLIP's usual
  `ndim < 2` rule would decay them.
  """
  def decays(path) -> bool:
    # A name matches a key equal to it or ending in '_<name>' (e.g. 'qkv_bias' for 'bias').
    return not any(key == name or key.endswith("_" + name)
                   for key in param_groups.path_names(path) for name in no_decay)
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def _decoupled_weight_decay(optim: ml_collections.ConfigDict) -> float:
  """The AdamW weight decay that gives `optim.decay_convention`'s per-step decay."""
  if optim.decay_convention not in DECAY_CONVENTIONS:
    raise ValueError(f"config.optim.decay_convention={optim.decay_convention!r}: use one of "
                     f"{', '.join(DECAY_CONVENTIONS)}.")
  if optim.decay_convention == "adamw" or not optim.weight_decay:
    return float(optim.weight_decay)
  if optim.lr <= 0:
    raise ValueError("config.optim.decay_convention=big_vision scales decay by lr(t) / lr: "
                     "config.optim.lr must be positive.")
  # big_vision: p -= lr(t) * adam + wd * lr(t)/lr * p  ==  p -= lr(t) * (adam + wd/lr * p).
  return float(optim.weight_decay) / float(optim.lr)


def _adamw(optim: ml_collections.ConfigDict, schedule: optax.Schedule, decay_mask: Any,
           multipliers: dict | None) -> optax.GradientTransformation:
  """optax.adamw, or with multipliers its three steps with the multiplier where the convention
  puts it (module docstring)."""
  weight_decay = _decoupled_weight_decay(optim)
  if multipliers is None:
    return optax.adamw(learning_rate=schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=weight_decay, mask=decay_mask)
  decay = optax.add_decayed_weights(weight_decay, decay_mask)
  scale = param_groups.scale_by_multipliers(multipliers)
  middle = (decay, scale) if optim.decay_convention == "adamw" else (scale, decay)
  return optax.chain(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps), *middle,
                     optax.scale_by_learning_rate(schedule))


def make_optimizer(config: ml_collections.ConfigDict, params: Any
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, schedule). `params` is only used for the tree structure of the masks."""
  optim = config.optim
  schedule = learning_rate_schedule(optim, config.total_steps)
  param_groups.check_config(config)
  no_decay = tuple(optim.no_decay)
  parts = []
  if optim.grad_clip_norm and optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  # A callable mask: under multi_transform it is evaluated on the trainable subtree only.
  parts.append(_adamw(optim, schedule, lambda tree: weight_decay_mask(tree, no_decay),
                      param_groups.lr_multipliers(config, params)))
  tx = optax.chain(*parts)
  labels = param_groups.labels_of(config, params)
  if param_groups.FROZEN in jax.tree.leaves(labels):
    # Only when something is frozen: the plain chain keeps older checkpoints' optimizer state.
    tx = optax.multi_transform({param_groups.TRAINABLE: tx,
                                param_groups.FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule
