"""The device mesh, the logical-axis rules table, and parameters created directly in their sharding.

One mesh with axes (data, fsdp, tensor). Batches are split over data x fsdp; parameters are
annotated with logical names (`embed`, `mlp`, ...) and LOGICAL_RULES maps each name to a mesh axis.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Every logical name the models use. NNX passes an unmapped name straight through as a mesh axis
# name and then fails ("Resource axis ... not found in mesh"), so small or replicated axes are
# listed too, mapped to None.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),     # activations: the global batch is split over data x fsdp
    # FSDP (ZeRO-3): every large weight has an `embed` (model width) dim; sharding it over fsdp
    # splits the weights and their optimizer moments; XLA all-gathers them per layer for compute.
    # Width-sized biases follow their dim name too (tiny; it keeps "every param of width D is
    # split the same way" simple to reason about).
    ("embed", "fsdp"),
    ("mlp", "tensor"),         # MLP hidden dim: Megatron-style tensor parallelism
    ("heads", "tensor"),       # attention heads: tensor parallel, like the MLP hidden dim
    ("vocab", "tensor"),       # token embedding rows
    ("qkv", None),             # the size-3 axis of the fused q/k/v kernel
    ("kv", None),              # per-head dim: too small to split, and attention contracts over it
    ("head_dim", None),        # alias of `kv`, kept so either name is valid
    ("layers", None),          # the scanned depth axis: scan slices it, so it must stay whole
    ("norm", None),            # LayerNorm scale/bias: tiny, replicated
    ("patch", None),           # patch-embedding conv kernel (height, width, in-channels)
    ("position", None),        # positional-embedding rows: sliced per sequence length
    ("joint", None),           # joint image-text embedding dim (projection output)
)


# ---- mesh ----------------------------------------------------------------------------------------


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor) from config.mesh; one axis may be -1 (the remaining devices)."""
  sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
  unknown = set(dict(mesh_cfg).keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}.")
  fill = [axis for axis, size in sizes.items() if size == -1]
  bad = [axis for axis, size in sizes.items() if size == 0 or size < -1]
  if bad:
    raise ValueError(f"config.mesh.{bad[0]}={sizes[bad[0]]}: axis sizes must be positive or -1.")
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {', '.join(fill)} "
                     f"({_describe(sizes)}).")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh ({_describe(sizes)}): {num_devices} devices are not "
                       f"divisible by the fixed axes' product {known}, so "
                       f"config.mesh.{fill[0]}=-1 cannot fill.")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(f"config.mesh ({_describe(sizes)}): product {known} != {num_devices} devices. "
                     "Change config.mesh.* or set one axis to -1.")
  return tuple(sizes[axis] for axis in MESH_AXES)


def _describe(sizes: Mapping[str, int]) -> str:
  return ", ".join(f"{axis}={size}" for axis, size in sizes.items())


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (sharding propagated by the compiler)."""
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if devices is None:
    shape = mesh_shape(mesh_cfg, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  devices = np.asarray(devices)
  shape = mesh_shape(mesh_cfg, devices.size)
  return Mesh(devices.reshape(shape), MESH_AXES, axis_types=axis_types)


# ---- shardings -----------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over data x fsdp, every other dim whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
  """Rows of the global batch this process must feed (to make_array_from_process_local_data)."""
  num_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % num_shards:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the mesh batch axes "
                     f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {num_shards}.")
  # Count distinct row blocks on this process's devices: with a tensor axis spanning processes,
  # several processes hold the same rows, so global_batch / process_count would be wrong.
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  blocks = {index[0].indices(global_batch)[:2] for index in indices.values()}
  return sum(stop - start for start, stop in blocks)


def state_shardings(tree: Any) -> Any:
  """The `.sharding` of every leaf (arrays or ShapeDtypeStructs), e.g. for jit in/out_shardings."""
  return jax.tree.map(lambda x: x.sharding, tree)


def check_divisible(tree: Any, mesh: Mesh, what: str = "Parameter",
                    fix: str = "or the model width/heads/vocab") -> None:
  """Raises a ValueError naming the parameter and the mesh axis when a sharded dim does not split
  evenly (jit would otherwise fail later with a message about pjit outputs)."""
  def check(path, leaf):
    for dim, (size, axes) in enumerate(zip(leaf.shape, leaf.sharding.spec)):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      parts = math.prod(mesh.shape[a] for a in axes)
      if size % parts:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        raise ValueError(
            f"{what} {name} of shape {tuple(leaf.shape)}: dim {dim} (size {size}) cannot be "
            f"split over mesh axes {axes} of total size {parts}. Change config.mesh."
            f"{'/'.join(axes)} to a divisor of {size}, {fix}.")
  jax.tree_util.tree_map_with_path(check, tree)


# ---- sharded model creation ----------------------------------------------------------------------


def abstract_model(model_fn: Callable[[], nnx.Module], mesh: Mesh
                   ) -> tuple[nnx.GraphDef, dict, dict]:
  """(graphdef, params, rest) of `model_fn()` as pure dicts of ShapeDtypeStructs carrying their
  NamedShardings on `mesh`: no parameter is computed. Also the restore target for Orbax."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
    graphdef, abstract_state = nnx.get_abstract_model(model_fn, mesh)
  params, rest = nnx.split_state(abstract_state, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def create_sharded(model_fn: Callable[[], nnx.Module], mesh: Mesh
                   ) -> tuple[nnx.GraphDef, dict, dict]:
  """Builds `model_fn()` with every parameter created in its final sharding.

  `model_fn` takes no arguments and must create its own `nnx.Rngs` (it is traced, not run eagerly).
  It is traced twice: abstractly for the shardings, then under `jax.jit(out_shardings=...)`.
  Eager NNX creation would run each initializer whole on one device and only then shard it; under
  jit with partitionable threefry (jax's default) each device generates just its own slice, and
  the values do not depend on the mesh.

  Returns:
    (graphdef, params, rest): pure nested dicts of `nnx.Param` arrays and of all other state (may be
    empty). Rebuild the module with `nnx.merge(graphdef, params, rest)`, also inside jax.jit.
  """
  graphdef, abstract_params, abstract_rest = abstract_model(model_fn, mesh)
  check_divisible(abstract_params, mesh)
  check_divisible(abstract_rest, mesh)

  def init():
    _, params, rest = nnx.split(model_fn(), nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  out_shardings = (state_shardings(abstract_params), state_shardings(abstract_rest))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
    params, rest = jax.jit(init, out_shardings=out_shardings)()
  return graphdef, params, rest
