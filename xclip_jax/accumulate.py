"""Gradient accumulation that keeps the whole global batch as contrastive negatives.

open_clip's accum-freq scheme: pass 1 computes every micro-batch's embeddings without gradients;
pass 2, micro-batch by micro-batch, recomputes that micro-batch's embeddings with gradients and
evaluates the loss over the full batch with the other rows taken from the cache. Summing these
gradients gives exactly the gradient of the full-batch loss, since dL/dθ = Σ_k ∂L/∂f_k · df_k/dθ
with every ∂L/∂f_k at the cached (equal) values. Activations are held for one micro-batch at a
time; each micro-batch is encoded twice.

Micro-batch k is rows k, k + K, k + 2K, ... so every device keeps feeding its own rows: no data
moves between devices. Outputs that depend on the parameters only (the logit scale) enter the
loss directly as well as through the features, so their direct gradient is taken from the first
micro-batch's pass only. Which outputs are which, the method declares
(methods.base.Accumulation); methods whose loss needs more than such outputs (DeCLIP's BatchNorm
heads and queue, SLIP's views) declare none and are refused.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

def to_micro(x: jax.Array, steps: int) -> jax.Array:
  """[B, ...] -> [K, B/K, ...]: micro-batch k holds rows k, k + K, ..."""
  return jnp.swapaxes(x.reshape((x.shape[0] // steps, steps) + x.shape[1:]), 0, 1)


def from_micro(x: jax.Array) -> jax.Array:
  """Inverse of `to_micro`."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def accumulated_value_and_grad(graphdef: Any, params: Any, model_state: Any,
                               batch: dict[str, jax.Array], steps: int,
                               loss_of_outputs: Callable[[dict[str, jax.Array]], tuple],
                               features: Sequence[str], shared: Sequence[str] = (),
                               prepare_params: Callable[[Any], Any] = lambda params: params):
  """((loss, metrics), grads) of loss_of_outputs(model outputs of the whole batch).

  `features` name the per-example outputs the loss reads (cached), `shared` the outputs that
  depend on the parameters only (e.g. the logit scale); the method declares both
  (methods.base.Accumulation), and the loss must read nothing else. `prepare_params` maps the
  differentiated parameters to the model's (the train step's stop_gradient of frozen ones).
  """
  features, shared = tuple(features), tuple(shared)
  micro = jax.tree.map(lambda x: to_micro(x, steps), batch)

  def embed(params, micro_batch):
    out = nnx.merge(graphdef, prepare_params(params), model_state)(micro_batch, train=True)
    return {k: out[k] for k in features}, {k: out[k] for k in shared}

  # Pass 1: every micro-batch's features, no gradients.
  cached, shared_values = jax.lax.map(lambda mb: embed(jax.lax.stop_gradient(params), mb), micro)
  cached = jax.tree.map(jax.lax.stop_gradient, cached)
  shared_values = jax.tree.map(lambda x: x[0], shared_values)

  def micro_loss(params, k, micro_batch):
    fresh, fresh_shared = embed(params, micro_batch)
    outputs = {key: from_micro(cached[key].at[k].set(fresh[key])) for key in features}
    # The direct gradient of a shared output is taken once, from the first micro-batch.
    outputs.update({key: jnp.where(k == 0, value, jax.lax.stop_gradient(value))
                    for key, value in fresh_shared.items()})
    return loss_of_outputs(outputs)[0]

  # Pass 2: each micro-batch's share of the full-batch gradient.
  def body(grads, k_and_batch):
    k, micro_batch = k_and_batch
    g = jax.grad(micro_loss)(params, k, micro_batch)
    return jax.tree.map(jnp.add, grads, g), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, _ = jax.lax.scan(body, zeros, (jnp.arange(steps), micro))
  full = {key: from_micro(cached[key]) for key in features}
  full.update(shared_values)
  return loss_of_outputs(full), grads
