"""The shard_map chunked CLIP loss against the global version: values, gradients, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from xclip_jax.objectives import clip, clip_chunked
from xclip_jax.parallel import mesh as mesh_lib


def _inputs(n, d, seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return unit(rng.normal(size=(n, d))), unit(rng.normal(size=(n, d)))


@pytest.mark.parametrize("shape,chunk", [((8, 1, 1), 16), ((4, 2, 1), 8), ((2, 4, 1), 64)])
def test_chunked_loss_and_grads_equal_the_global_loss(shape, chunk):
  mesh = mesh_lib.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
  img, txt = _inputs(64, 16)
  img[3] = txt[3]                                         # a confident pair: large logits
  scale = np.float32(30.0)
  sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  img_s, txt_s = jax.device_put(img, sharding), jax.device_put(txt, sharding)

  def chunked(i, t, s):
    return clip_chunked.clip_loss_chunked(i, t, s, chunk=chunk)[0]

  with jax.set_mesh(mesh):
    value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(img_s, txt_s, scale)
  ref_value, ref_grads = jax.value_and_grad(
      lambda i, t, s: clip.clip_loss(i, t, s)[0], argnums=(0, 1, 2))(img, txt, scale)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_chunk_must_divide_the_batch():
  mesh = mesh_lib.make_mesh(dict(data=8))
  img, txt = _inputs(16, 4)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="chunk=5"):
    jax.jit(lambda i, t: clip_chunked.clip_loss_chunked(i, t, 1.0, chunk=5)[0])(img, txt)


def _temp_bytes(loss_fn, batch, dim, mesh):
  sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
  grad = jax.jit(jax.grad(lambda i, t: loss_fn(i, t), argnums=(0, 1)))
  with jax.set_mesh(mesh):
    return grad.lower(spec, spec).compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_needs_far_less_memory_at_a_32k_batch():
  """Compile-only: per-device temporaries of the gradient at global batch 32,768, dim 512."""
  mesh = mesh_lib.make_mesh(dict(data=8))
  glob = _temp_bytes(lambda i, t: clip.clip_loss(i, t, 10.0)[0], 32768, 512, mesh)
  chunked = _temp_bytes(lambda i, t: clip_chunked.clip_loss_chunked(i, t, 10.0, chunk=2048)[0],
                        32768, 512, mesh)
  print(f"temp bytes per device at B=32768: global {glob / 2**20:.0f} MiB, "
        f"chunked {chunked / 2**20:.0f} MiB")
  assert chunked < glob / 4


def test_train_step_with_the_chunked_loss_equals_the_global_one():
  from tests.tiny import tiny_config, tiny_state
  rng = np.random.RandomState(0)
  text = rng.randint(4, 200, size=(16, 32)).astype(np.int32)
  text[:, 9], text[:, 10:] = 2, 0
  batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32), "text": text}
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2))
  losses = {}
  for impl in ("global", "chunked"):
    config = tiny_config("", **{"model.image.patch_size": 8, "contrastive.impl": impl,
                                "contrastive.chunk": 4})
    state, step = tiny_state(mesh, config)
    with jax.set_mesh(mesh):
      state, m = step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)))
    losses[impl] = (float(m["loss"]), float(m["grad_norm"]))
  np.testing.assert_allclose(losses["chunked"], losses["global"], rtol=1e-5)
