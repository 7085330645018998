"""An exponential moving average (EMA) of the parameters, kept in the train state.

With config.ema_decay = d > 0 the state holds `ema_params`, a copy of `params` in the same
shardings, and every step (inside the jitted step, after the update) moves it towards the new
parameters:

    ema_t = ema_{t-1} + w_t (params_t - ema_{t-1}),   w_t = (1 - d) / (1 - d^t),   t = step

This is optax.ema(d, debias=True)'s output written as a recurrence on the debiased average
itself: ema_t = sum_i (1 - d) d^(t-i) params_i / (1 - d^t) over the steps so far. Why debias:
the plain `ema = d ema + (1 - d) params` started at the initial parameters keeps a weight d^t on
the random initialisation (0.37 after 10k steps at d = 0.9999), which makes early evaluations of
the EMA meaningless; optax's zero start without the division would shrink it towards 0 instead.
The debiased average weighs only the parameters the run has produced (ema_1 = params_1) and needs
no warm-up constant of its own. It is stored debiased, so `ema_params` is a usable parameter tree
(`xclip_jax.load(workdir, ema=True)`) with no count to apply. A skipped (non-finite) step keeps
its parameters and the EMA moves towards those. Non-parameter model state (BatchNorm statistics)
is not averaged: the EMA is evaluated with the raw run's `model_state`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

KEY = "ema_params"          # the train state's (and so the checkpoint's) subtree
PREFIX = "ema/"             # evaluation results of the EMA parameters: ema/zeroshot/top1, ...


def decay_of(config: ml_collections.ConfigDict | dict) -> float:
  """config.ema_decay (of a config or its saved JSON), 0 when the field is missing (configs
  saved before it existed)."""
  return float(config.get("ema_decay", 0.0) or 0.0)


def check(config: ml_collections.ConfigDict) -> None:
  decay = decay_of(config)
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"config.ema_decay={decay}: use 0 (no EMA) or a decay in (0, 1), e.g. "
                     "0.9999 (an average over ~1/(1 - decay) = 10k steps).")


def add_to_state(state: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`state` with `ema_params` (a copy of its params, same shardings) if config.ema_decay > 0;
  with none otherwise (so a run without EMA saves no EMA)."""
  state = {k: v for k, v in state.items() if k != KEY}
  if decay_of(config) > 0:
    # A copy, not the same buffers: the step donates the state, and one buffer cannot be
    # donated twice.
    shardings = jax.tree.map(lambda x: x.sharding, state["params"])
    state[KEY] = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(
        state["params"])
  return state


def update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
  """The EMA after the update that produced `params` at `step` (>= 1); see the module docstring.

  Traced inside the train step; the decay is a Python constant, and d^t is exp(t log d) so that
  d = 0.9999 loses no digits to float32's 1 - d.
  """
  t = step.astype(jnp.float32)
  weight = (1.0 - decay) / -jnp.expm1(t * math.log(decay))
  return jax.tree.map(lambda e, p: e + weight.astype(e.dtype) * (p - e), ema, params)


def reference(params_per_step: list[Any], decay: float) -> Any:
  """The same average in numpy float64 from the parameters after steps 1..t (for tests and
  checks): sum_i (1 - d) d^(t-i) params_i / (1 - d^t)."""
  import numpy as np  # noqa: PLC0415
  t = len(params_per_step)
  weights = np.array([(1 - decay) * decay**(t - i) for i in range(1, t + 1)]) / (1 - decay**t)
  return jax.tree.map(lambda *xs: sum(w * np.asarray(x, np.float64)
                                      for w, x in zip(weights, xs)), *params_per_step)


def restore(restore_fn, step: int, state: dict[str, Any], saved_decay: float,
            config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Restores checkpoint `step` into `state`'s layout with `restore_fn(step, abstract)`, where the
  checkpoint and this run may disagree on having an EMA (a --resume_with_changes of
  config.ema_decay): a checkpoint without one starts the EMA at its parameters; one with an EMA
  that this run does not keep is read and dropped."""
  from xclip_jax import train_state as ts  # noqa: PLC0415  (train_state imports this module)
  target = {k: v for k, v in state.items() if k != KEY}
  if saved_decay > 0:
    target[KEY] = target["params"]
  restored = restore_fn(step, ts.abstract_of(target))
  if (saved_decay > 0) != (decay_of(config) > 0):
    restored = add_to_state(restored, config)
  return restored


def prefixed(results: dict[str, float]) -> dict[str, float]:
  return {PREFIX + k: v for k, v in results.items()}
