"""Features of whole splits for the evaluators: images from a padded, masked eval dataset (each
process its own slice) and texts from a list every process holds, both sharded over the mesh and
gathered to every host without the padding. Each call computes every requested feature space
(evaluate/spaces.py) in one pass of the tower."""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from xclip_jax.parallel import mesh as mesh_lib


@functools.partial(jax.jit, static_argnums=(0, 1))
def _image_features(graphdef, spaces, params, model_state, images):
  return nnx.merge(graphdef, params, model_state).image_features(images, spaces)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _text_features(graphdef, spaces, params, model_state, ids):
  return nnx.merge(graphdef, params, model_state).text_features(ids, spaces)


def _gather(x: jax.Array) -> np.ndarray:
  """A global array as one numpy array on every host."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def image_features(batches: Iterable[dict[str, np.ndarray]], mesh: jax.sharding.Mesh,
                   graphdef: Any, params: Any, model_state: Any, spaces: tuple[str, ...],
                   keys: tuple[str, ...] = ("label", "index")) -> dict[str, np.ndarray]:
  """{<space>: [N, D_space] per space, <keys>: [N]} over every process's host batches, padding
  (mask 0) dropped."""
  spaces = tuple(spaces)
  sharding = mesh_lib.batch_sharding(mesh)
  out = {"mask": [], **{k: [] for k in spaces + tuple(keys)}}
  with jax.set_mesh(mesh):
    for batch in batches:
      batch = jax.make_array_from_process_local_data(sharding, batch)
      feats = _image_features(graphdef, spaces, params, model_state, batch["image"])
      for space in spaces:
        out[space].append(_gather(feats[space]))
      for k in ("mask",) + tuple(keys):
        out[k].append(_gather(batch[k]))
  mask = np.concatenate(out.pop("mask")).astype(bool)
  return {k: np.concatenate(v)[mask] for k, v in out.items()}


def image_embeddings(batches: Iterable[dict[str, np.ndarray]], mesh: jax.sharding.Mesh,
                     graphdef: Any, params: Any, model_state: Any,
                     keys: tuple[str, ...] = ("label", "index")) -> dict[str, np.ndarray]:
  """{"emb": [N, D] L2-normalised CLIP embeddings, <keys>: [N]}, padding dropped."""
  out = image_features(batches, mesh, graphdef, params, model_state, ("clip",), keys)
  out["emb"] = out.pop("clip")
  return out


def text_features(ids: np.ndarray, batch_size: int, mesh: jax.sharding.Mesh, graphdef: Any,
                  params: Any, model_state: Any, spaces: tuple[str, ...]
                  ) -> dict[str, np.ndarray]:
  """{<space>: [M, D_space]} of int32 [M, L] ids held identically by every process."""
  spaces = tuple(spaces)
  shards = int(np.prod([mesh.shape[a] for a in mesh_lib.BATCH_AXES]))
  batch_size = -(-batch_size // shards) * shards
  sharding = mesh_lib.batch_sharding(mesh)
  num = len(ids)
  ids = np.concatenate([ids, np.zeros(((-num) % batch_size, ids.shape[1]), ids.dtype)])
  chunks = {space: [] for space in spaces}
  with jax.set_mesh(mesh):
    for start in range(0, len(ids), batch_size):
      rows = ids[start:start + batch_size]
      # Each process passes the rows its devices hold (contiguous, in process order).
      local = rows.reshape(jax.process_count(), -1, rows.shape[1])[jax.process_index()]
      chunk = jax.make_array_from_process_local_data(sharding, local)
      feats = _text_features(graphdef, spaces, params, model_state, chunk)
      for space in spaces:
        chunks[space].append(_gather(feats[space]))
  return {space: np.concatenate(c)[:num] for space, c in chunks.items()}


def text_embeddings(ids: np.ndarray, batch_size: int, mesh: jax.sharding.Mesh, graphdef: Any,
                    params: Any, model_state: Any) -> np.ndarray:
  """[M, D] L2-normalised CLIP embeddings of int32 [M, L] ids held identically by every process."""
  return text_features(ids, batch_size, mesh, graphdef, params, model_state, ("clip",))["clip"]
