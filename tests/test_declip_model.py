"""DeCLIP's model and train state: heads, two-view forward, the sharded queue, and a full train
step on 8 devices equal to 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xclip_jax import checkpoint, optim
from xclip_jax import train_state as ts
from xclip_jax import methods
from xclip_jax.models import two_tower
from xclip_jax.data import text_spec
from xclip_jax.parallel import mesh as mesh_lib

import configs.declip as declip_config

TEXT_SPEC = text_spec.TextSpec.reserved(200)     # pad 0, eos 2, mask 3, pieces from 4


def tiny_config(**overrides):
  c = declip_config.get_config("demo")
  c.batch_size = 16
  c.model.embed_dim = 16
  c.model.image.update(dict(width=32, layers=2, heads=2, patch_size=8))
  c.model.text.update(dict(width=32, layers=2, heads=2))
  c.declip.update(dict(queue_size=64, projector_hidden=32, projector_dim=24, predictor_hidden=8))
  # Clipping at norm 1 (the demos no longer clip) keeps these steps small: with lr 1e-2 and no
  # clipping, reduction-order noise moves step 3's SimSiam loss (~0.01) by ~2e-6 across meshes.
  c.optim.update(dict(warmup_steps=1, lr=1e-2, eps=1e-3, grad_clip_norm=1.0))
  for k, v in overrides.items():
    c.declip[k] = v
  return c


def make_batch(seed=0, b=16):
  rng = np.random.RandomState(seed)
  text = rng.randint(4, 200, size=(b, 32)).astype(np.int32)
  text[:, 12], text[:, 13:] = 2, 0
  aug = np.roll(text, 1, axis=0)
  return {"image": rng.normal(size=(b, 32, 32, 3)).astype(np.float32),
          "image2": rng.normal(size=(b, 32, 32, 3)).astype(np.float32),
          "text": text, "text_aug": aug}


def test_interleave_keeps_each_samples_views_together():
  a, b = jnp.arange(3)[:, None] * 10, jnp.arange(3)[:, None] * 10 + 1
  x = two_tower.interleave(a, b)
  np.testing.assert_array_equal(x[:, 0], [0, 1, 10, 11, 20, 21])
  back = two_tower.split_views(x)
  np.testing.assert_array_equal(back[0], a)
  np.testing.assert_array_equal(back[1], b)


def test_forward_outputs_and_per_view_equivalence():
  config = tiny_config()
  model = methods.build_model(config, eos_id=2, seed=0)
  batch = make_batch()
  out = model(batch, train=True)
  assert out["z1"].shape == out["z2"].shape == (16, 24)
  assert out["p1"].shape == (16, 24)
  assert out["mlm_logits"].shape == (16, 32, config.model.text.vocab_size)
  # The interleaved forward equals running each view on its own.
  np.testing.assert_allclose(out["image_emb2"], model.encode_image(batch["image2"]), atol=1e-5)
  np.testing.assert_allclose(out["text_emb_aug"], model.encode_text(batch["text_aug"]), atol=1e-5)
  # BatchNorm is called once per view (DeCLIP's per-view statistics): the running mean (momentum
  # 0.9, from 0) is 0.9 * 0.1 * mean(view 1) + 0.1 * mean(view 2) of the first linear's outputs.
  first = lambda images: np.asarray(model.projector.linears[0](model.image(images)["embed"])).mean(0)
  expected = 0.9 * 0.1 * first(batch["image"]) + 0.1 * first(batch["image2"])
  np.testing.assert_allclose(model.projector.norms[0].mean[...], expected, rtol=1e-4, atol=1e-6)
  # Without the second views it is the CLIP forward (evaluation).
  plain = model({"image": batch["image"], "text": batch["text"]}, train=False)
  assert "z1" not in plain


def test_queue_is_sharded_over_every_device_and_restored(tmp_path):
  config = tiny_config()
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2, tensor=1))
  state = ts.init_method_state(methods.get_method("declip"), config, mesh, seed=0)
  queue = state["queue"]
  assert queue.shape == (64, 16)
  assert {s.data.shape for s in queue.addressable_shards} == {(8, 16)}
  np.testing.assert_allclose(np.linalg.norm(np.asarray(queue), axis=1), 1.0, rtol=1e-5)

  state = {"method_state": {"queue": queue * 2, "ptr": jnp.int32(40)}}
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
  ckpt.save(1, state, config)
  ckpt.wait()
  other = mesh_lib.make_mesh(dict(data=8, fsdp=1, tensor=1))
  target = {"method_state": ts.init_method_state(methods.get_method("declip"), config, other, 1)}
  restored = ckpt.restore(1, ts.abstract_of(target))
  ckpt.close()
  np.testing.assert_array_equal(restored["method_state"]["queue"], np.asarray(queue) * 2)
  assert int(restored["method_state"]["ptr"]) == 40
  assert restored["method_state"]["queue"].sharding.mesh.shape == other.shape


def _trajectory(mesh, config, batches):
  method = methods.get_method("declip")
  model_fn = lambda: methods.build_model(config, eos_id=2, seed=0)
  graphdef, params, rest = mesh_lib.create_sharded(model_fn, mesh)
  tx, schedule = optim.make_optimizer(config, params)
  state = ts.init_train_state(params, rest, tx, mesh, 0,
                              ts.init_method_state(method, config, mesh, 0))
  step = ts.jit_train_step(ts.make_train_step(graphdef, tx, schedule, method, config, TEXT_SPEC),
                           ts.shardings_of(state), mesh_lib.batch_sharding(mesh), mesh)
  metrics = []
  with jax.set_mesh(mesh):
    for b in batches:
      state, m = step(state, jax.device_put(b, mesh_lib.batch_sharding(mesh)))
      metrics.append(jax.device_get(m))
  return metrics, jax.device_get(state)


@pytest.mark.slow
def test_declip_train_step_on_8_devices_equals_1_device():
  config = tiny_config()
  # The train step takes uint8 pixels and augments them on the device (data/device_augment.py).
  # make_batch's normal floats would be read as pixels near 0: near-black, near-identical views.
  pixels = lambda s: {k: np.random.default_rng([s, v]).integers(0, 256, (16, 32, 32, 3), np.uint8)
                      for v, k in enumerate(("image", "image2"))}
  batches = [dict(make_batch(s), **pixels(s)) for s in range(3)]
  one = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  eight = mesh_lib.make_mesh(dict(data=4, fsdp=2, tensor=1))
  m1, s1 = _trajectory(one, config, batches)
  m8, s8 = _trajectory(eight, config, batches)
  for name in ("loss", "clip_loss", "simsiam_loss", "mlm_loss", "nns_loss", "mlm_tokens"):
    np.testing.assert_allclose([m[name] for m in m8], [m[name] for m in m1], rtol=2e-5, atol=1e-6,
                               err_msg=name)
  assert m1[0]["mlm_tokens"] > 0 and m1[0]["loss"] != m1[-1]["loss"]
  for a, b in zip(jax.tree.leaves(s8), jax.tree.leaves(s1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The queue advanced by 2 x 16 captions per step and holds unit vectors.
  assert int(s1["method_state"]["ptr"]) == (3 * 32) % 64
  np.testing.assert_allclose(np.linalg.norm(s1["method_state"]["queue"], axis=1), 1, rtol=1e-5)
