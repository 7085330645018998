"""Method-specific heads on top of the shared towers: DeCLIP's SimSiam projector and predictor and
its MLM head. (nCLIP's prototype heads join them here.)

BatchNorm runs on global arrays inside the jitted step, so its statistics are over the global
batch (XLA inserts the cross-device reductions); DeCLIP's code used per-GPU statistics.
PyTorch's BatchNorm1d defaults are kept: momentum 0.1 (flax momentum 0.9), epsilon 1e-5.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5


def dense(in_dim: int, out_dim: int, *, names: tuple[str, str], dtype: Any, rngs: nnx.Rngs,
          use_bias: bool = True) -> nnx.Linear:
  """nnx.Linear with PyTorch's default init (uniform ±1/sqrt(in)) and logical axis names."""
  bound = in_dim**-0.5
  init = lambda key, shape, dt=jnp.float32: jax.random.uniform(key, shape, dt, -bound, bound)
  return nnx.Linear(in_dim, out_dim, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.with_partitioning(init, names),
                    bias_init=nnx.with_partitioning(init, (names[1],)), rngs=rngs)


def batch_norm(features: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                       param_dtype=jnp.float32,
                       scale_metadata={"out_sharding": ("norm",)},
                       bias_metadata={"out_sharding": ("norm",)}, rngs=rngs)


class SimSiamProjector(nnx.Module):
  """DeCLIP's projection_MLP: 3 x (Linear -> BatchNorm), ReLU between; the last BN is affine."""

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    dims = (in_dim, hidden_dim, hidden_dim, out_dim)
    self.linears = nnx.List([dense(a, b, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
                             for a, b in zip(dims[:-1], dims[1:])])
    self.norms = nnx.List([batch_norm(b, rngs=rngs) for b in dims[1:]])

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
      x = norm(linear(x), use_running_average=not train)
      if i < len(self.linears) - 1:
        x = jax.nn.relu(x)
    return x


class SimSiamPredictor(nnx.Module):
  """DeCLIP's prediction_MLP: Linear -> BatchNorm -> ReLU -> Linear (no BN on the output)."""

  def __init__(self, dim: int, hidden_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = dense(dim, hidden_dim, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.norm = batch_norm(hidden_dim, rngs=rngs)
    self.fc2 = dense(hidden_dim, dim, names=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.fc2(jax.nn.relu(self.norm(self.fc1(x), use_running_average=not train)))


class MLMHead(nnx.Module):
  """One Linear from the text width to the vocabulary at every position (DeCLIP's
  text_label_predictor; with bias, not tied to the token embedding)."""

  def __init__(self, width: int, vocab_size: int, *, dtype: Any, rngs: nnx.Rngs):
    self.linear = dense(width, vocab_size, names=("embed", "vocab"), dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.linear(tokens)


class PrototypeHead(nnx.Module):
  """DINO-style head: MLP (GELU) -> bottleneck -> L2-normalise; logits are cosine similarities
  with K weight-normalised prototypes (`prototypes` may be shared with another head)."""

  def __init__(self, in_dim: int, hidden: int, bottleneck: int, layers: int, *, dtype: Any,
               rngs: nnx.Rngs):
    dims = (in_dim,) + (hidden,) * (layers - 1) + (bottleneck,)
    self.linears = nnx.List([dense(a, b, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
                             for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x: jax.Array, prototypes: jax.Array) -> jax.Array:
    for i, linear in enumerate(self.linears):
      x = linear(x)
      if i < len(self.linears) - 1:
        x = jax.nn.gelu(x, approximate=False)
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    w = prototypes / jnp.maximum(jnp.linalg.norm(prototypes, axis=0, keepdims=True), 1e-6)
    return x @ w


class SimCLRHead(nnx.Module):
  """SLIP's SSL projection: Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear (4096-4096-256)."""

  def __init__(self, in_dim: int, hidden: int, out_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = dense(in_dim, hidden, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(hidden, rngs=rngs)
    self.fc2 = dense(hidden, hidden, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(hidden, rngs=rngs)
    self.fc3 = dense(hidden, out_dim, names=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = jax.nn.relu(self.bn1(self.fc1(x), use_running_average=not train))
    x = jax.nn.relu(self.bn2(self.fc2(x), use_running_average=not train))
    return self.fc3(x)
