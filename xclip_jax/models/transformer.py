"""The pre-LN residual block shared by the image and text towers, stacked and scanned over depth.

Parameters are always float32; `dtype` is the compute dtype (params and activations are cast to it
at use). Every parameter carries logical axis names (see parallel/mesh.py LOGICAL_RULES); stacked
layer parameters get a leading `layers` axis.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPSILON = 1e-5  # CLIP's (PyTorch's) LayerNorm epsilon, not flax's 1e-6

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),   # OpenAI CLIP's QuickGELU
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}

# Which block intermediates the backward pass keeps (None: no rematerialisation at all).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Saves weight matmul outputs; recomputes the rest (norms, activations, and attention, whose
    # einsums have batch dims).
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def mesh_optional(init: Callable[..., None]) -> Callable[..., None]:
  """Decorates a Module `__init__` so it also works with no mesh set.

  NNX shards annotated parameters as they are created, which needs a mesh (`jax.set_mesh`). With
  no mesh (notebooks, unit tests) we create plain unsharded arrays instead; the logical names
  stay in the metadata, so parallel/mesh.py can still shard the same model.
  """

  @functools.wraps(init)
  def wrapped(*args, **kwargs):
    has_mesh = not jax.sharding.get_abstract_mesh().empty
    with nnx.use_eager_sharding(nnx.using_eager_sharding() and has_mesh):
      init(*args, **kwargs)

  return wrapped


def compute_dtype(name: str | jnp.dtype) -> jnp.dtype:
  """'float32' | 'bfloat16' (or a dtype) -> a jnp dtype."""
  dtype = jnp.dtype(name)
  if dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"compute dtype {name!r}: use float32 or bfloat16.")
  return dtype


def normal_param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...],
                 names: tuple[str | None, ...]) -> nnx.Param:
  """A float32 N(0, std^2) parameter annotated with logical axis names."""
  init = nnx.with_partitioning(nnx.initializers.normal(std), names)
  return nnx.Param(init(rngs.params(), shape, jnp.float32))


def zeros_param(shape: tuple[int, ...], names: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=names)


def layer_norm(width: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      width, epsilon=LN_EPSILON, dtype=dtype, param_dtype=jnp.float32,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with a fused q/k/v projection (CLIP's `in_proj`)."""

  def __init__(self, width: int, heads: int, *, out_std: float, causal: bool, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"width={width} is not divisible by heads={heads}.")
    head_dim = width // heads
    self.causal = causal
    self.dtype = dtype
    self.qkv_kernel = normal_param(rngs, width**-0.5, (width, 3, heads, head_dim),
                                   ("embed", "qkv", "heads", "kv"))
    self.qkv_bias = zeros_param((3, heads, head_dim), ("qkv", "heads", "kv"))
    self.out_kernel = normal_param(rngs, out_std, (heads, head_dim, width),
                                   ("heads", "kv", "embed"))
    self.out_bias = zeros_param((width,), ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    qkv = jnp.einsum("btd,dcnh->btcnh", x.astype(dt), self.qkv_kernel[...].astype(dt))
    qkv = qkv + self.qkv_bias[...].astype(dt)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]          # each [B, T, N, H]
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
    out = jnp.einsum("btnh,nhd->btd", out, self.out_kernel[...].astype(dt))
    return out + self.out_bias[...].astype(dt)


class MLP(nnx.Module):
  """width -> hidden -> width with CLIP's std for each kernel."""

  def __init__(self, width: int, hidden: int, *, out_std: float, activation: str,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r}: use one of {sorted(ACTIVATIONS)}.")
    self.activation = activation

    def linear(d_in, d_out, std, names):
      return nnx.Linear(
          d_in, d_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
          kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), names),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]))

    self.fc = linear(width, hidden, (2 * width)**-0.5, ("embed", "mlp"))
    self.proj = linear(hidden, width, out_std, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(ACTIVATIONS[self.activation](self.fc(x)))


class ResidualBlock(nnx.Module):
  """x + attn(ln_1(x)); x + mlp(ln_2(x)). Init follows OpenAI CLIP's `initialize_parameters`."""

  @mesh_optional
  def __init__(self, *, width: int, heads: int, mlp_ratio: float, depth: int, causal: bool,
               activation: str, dtype: Any, rngs: nnx.Rngs):
    dtype = compute_dtype(dtype)
    # Residual-output projections are scaled down with depth (CLIP's proj_std).
    out_std = width**-0.5 * (2 * depth)**-0.5
    self.ln_1 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.attn = SelfAttention(width, heads, out_std=out_std, causal=causal, dtype=dtype,
                              rngs=rngs)
    self.ln_2 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.mlp = MLP(width, int(width * mlp_ratio), out_std=out_std, activation=activation,
                   dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class ScannedBlocks(nnx.Module):
  """`layers` ResidualBlocks with stacked parameters (leading `layers` axis), run by lax.scan.

  Scanning traces one block, so compile time does not grow with depth. `remat` ('none' | 'full' |
  'dots') wraps the scanned block in jax.checkpoint with the matching policy.
  """

  @mesh_optional
  def __init__(self, *, layers: int, width: int, heads: int, mlp_ratio: float, causal: bool,
               activation: str, dtype: Any, remat: str, rngs: nnx.Rngs):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}: use one of {sorted(REMAT_POLICIES)}.")
    self.remat = remat
    self.num_layers = layers

    # vmap over split rngs gives each layer its own init; transform_metadata then prepends the
    # `layers` logical axis to every parameter's sharding names. Tree mode (graph=False) is spelt
    # out because nnx.vmap's own `transform_metadata=` is ignored in tree mode, the future default.
    @nnx.transform_metadata(in_axes=None, out_axes=0, partition="layers", graph=False)
    @nnx.split_rngs(splits=layers, graph=False)
    @nnx.vmap(in_axes=0, out_axes=0, graph=False)
    def create_blocks(rngs):
      return ResidualBlock(width=width, heads=heads, mlp_ratio=mlp_ratio, depth=layers,
                           causal=causal, activation=activation, dtype=dtype, rngs=rngs)

    self.blocks = create_blocks(rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    graphdef, stacked = nnx.split(self.blocks)

    def apply_block(x, layer_state):
      return nnx.merge(graphdef, layer_state)(x), None

    policy = REMAT_POLICIES[self.remat]
    if self.remat != "none":
      # prevent_cse=False is safe (and faster) inside scan, per the jax.checkpoint docs.
      apply_block = jax.checkpoint(apply_block, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(apply_block, x, stacked)
    return x
