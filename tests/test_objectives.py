"""SigLIP (global and ring), SimCLR's NT-Xent and nCLIP against numpy, and nCLIP's collapse test."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from xclip_jax.objectives import nclip, siglip, simclr
from xclip_jax.parallel import mesh as mesh_lib


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


# ---- SigLIP -------------------------------------------------------------------------------------


def test_siglip_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = _unit(rng.normal(size=(6, 4))), _unit(rng.normal(size=(6, 4)))
  t, b = 10.0, -10.0
  logits = t * img @ txt.T + b
  z = 2 * np.eye(6) - 1
  expected = np.sum(np.log1p(np.exp(-z * logits))) / 6
  np.testing.assert_allclose(siglip.siglip_loss(img, txt, t, b)[0], expected, rtol=1e-5)


@pytest.mark.parametrize("shape", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_siglip_ring_equals_global_in_value_gradients_and_metrics(shape):
  mesh = mesh_lib.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
  axes = ("data", "fsdp", "tensor") if shape[2] > 1 else mesh_lib.BATCH_AXES
  rng = np.random.default_rng(1)
  img, txt = _unit(rng.normal(size=(32, 8))), _unit(rng.normal(size=(32, 8)))
  txt[:12] = _unit(img[:12] + 0.3 * rng.normal(size=(12, 8)))   # some pairs retrievable
  t, b = np.float32(12.0), np.float32(-3.0)
  sharding = NamedSharding(mesh, P(axes))
  ring = lambda i, x, t, b: siglip.siglip_loss_ring(i, x, t, b, axes=axes)
  with jax.set_mesh(mesh):
    (value, metrics), grads = jax.jit(jax.value_and_grad(ring, argnums=(0, 1, 2, 3),
                                                         has_aux=True))(
        jax.device_put(img, sharding), jax.device_put(txt, sharding), t, b)
  (ref, ref_metrics), ref_grads = jax.value_and_grad(siglip.siglip_loss, argnums=(0, 1, 2, 3),
                                                     has_aux=True)(img, txt, t, b)
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  # The accuracies computed inside the ring equal numpy's argmax on the full logits.
  logits = t * img @ txt.T + b
  acc_i2t = np.mean(logits.argmax(1) == np.arange(32))
  acc_t2i = np.mean(logits.argmax(0) == np.arange(32))
  assert 0.2 < acc_i2t < 1 and 0.2 < acc_t2i < 1          # neither trivial nor saturated
  np.testing.assert_allclose(metrics["acc_i2t"], acc_i2t)
  np.testing.assert_allclose(metrics["acc_t2i"], acc_t2i)
  np.testing.assert_allclose(ref_metrics["acc_i2t"], acc_i2t)
  np.testing.assert_allclose(ref_metrics["acc_t2i"], acc_t2i)


def _siglip_temp_bytes(objective, batch, dim, mesh):
  sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
  grad = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True))
  with jax.set_mesh(mesh):
    return grad.lower(spec, spec).compile().memory_analysis().temp_size_in_bytes


def test_siglip_ring_with_its_metrics_needs_far_less_memory_at_a_32k_batch():
  """Compile-only: per-device temporaries of the gradient at global batch 32,768, dim 512, for
  the ring loss with the accuracies the way they used to be computed (global logits under
  stop-gradient) and with the accuracies computed inside the ring."""
  mesh = mesh_lib.make_mesh(dict(data=8))

  def before(i, x):
    loss, _ = siglip.siglip_loss_ring(i, x, 10.0, -10.0)
    _, metrics = siglip.siglip_loss(jax.lax.stop_gradient(i), jax.lax.stop_gradient(x),
                                    10.0, -10.0)
    return loss, metrics

  after = lambda i, x: siglip.siglip_loss_ring(i, x, 10.0, -10.0)
  old = _siglip_temp_bytes(before, 32768, 512, mesh)
  new = _siglip_temp_bytes(after, 32768, 512, mesh)
  print(f"SigLIP ring temp bytes per device at B=32768: with global-logit metrics "
        f"{old / 2**20:.0f} MiB, metrics inside the ring {new / 2**20:.0f} MiB")
  block = (32768 // 8)**2 * 4                  # one [B/n, B/n] float32 block of logits
  assert old > 8 * block                       # the [B/n, B] logits of the global metrics
  assert new < 4 * block                       # a few blocks at a time, whatever B/n is


# ---- SimCLR -------------------------------------------------------------------------------------


def test_nt_xent_matches_numpy_with_2n_minus_2_negatives():
  rng = np.random.default_rng(2)
  z1, z2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  a, b = _unit(z1), _unit(z2)
  total = 0
  for x, y in ((a, b), (b, a)):
    sims = np.concatenate([x @ y.T, x @ x.T - 1e9 * np.eye(5)], axis=1) / 0.1
    total += -np.mean(np.diag(_log_softmax(sims)[:, :5]))
  np.testing.assert_allclose(simclr.nt_xent_loss(z1, z2, 0.1)[0], total / 2, rtol=1e-5)


# ---- nCLIP --------------------------------------------------------------------------------------


def test_nclip_terms_match_numpy():
  rng = np.random.default_rng(3)
  lv, lt = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
  softmax = lambda x: np.exp(_log_softmax(x))
  p_v, p_t = softmax(lv / 0.1), softmax(lt / 0.2)
  q_v, q_t = softmax(lv / 0.05), softmax(lt / 0.05)
  align = 0.5 * (np.mean(-np.sum(q_t * np.log(p_v), 1)) + np.mean(-np.sum(q_v * np.log(p_t), 1)))
  ent = lambda p: -np.sum(p * np.log(p), -1)
  sharp = 0.5 * (ent(p_v).mean() + ent(p_t).mean())
  smooth = np.log(5) - 0.5 * (ent(p_v.mean(0)) + ent(p_t.mean(0)))
  loss, m = nclip.nclip_loss(lv, lt, image_temp=0.1, text_temp=0.2, target_temp=0.05,
                             stop_gradient_targets=True, sharp_weight=0.3, smooth_weight=2.0)
  np.testing.assert_allclose(m["nclip_align"], align, rtol=1e-5)
  np.testing.assert_allclose(loss, align + 0.3 * sharp + 2.0 * smooth, rtol=1e-5)
  assert m["nclip_prototypes_used"] == len(set(lv.argmax(1)) | set(lt.argmax(1)))


def test_stop_gradient_targets_block_the_target_path():
  lv, lt = jnp.ones((2, 3)) * jnp.arange(3.0), jnp.zeros((2, 3))
  f = lambda lt, sg: nclip.nclip_loss(lv, lt, image_temp=0.1, text_temp=0.1, target_temp=0.05,
                                      stop_gradient_targets=sg, sharp_weight=0.0,
                                      smooth_weight=0.0)[1]["nclip_align"]
  # Only the text -> image target depends on lt's distribution as a target; with stop-gradient
  # the gradient is only through log p_t.
  g_sg, g = jax.grad(f)(lt, True), jax.grad(f)(lt, False)
  assert not np.allclose(g_sg, g)


def _train_collapse_problem(sharp, smooth, steps=500, k=32, seed=0):
  """Two linear 'encoders' of fixed paired features plus a shared bias: at init every output is
  close to the bias, i.e. the trivial one-prototype solution is right there, as in real networks."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(16, 16))
  labels = rng.integers(0, 16, 256)
  xi = (centres[labels] + 0.3 * rng.normal(size=(256, 16))).astype(np.float32)
  xt = (centres[labels] + 0.3 * rng.normal(size=(256, 16))).astype(np.float32)
  keys = jax.random.split(jax.random.key(seed), 4)
  params = {"wi": 0.01 * jax.random.normal(keys[0], (16, 16)),
            "wt": 0.01 * jax.random.normal(keys[1], (16, 16)),
            "b": jax.random.normal(keys[2], (16,)), "protos": jax.random.normal(keys[3], (16, k))}

  def logits(h, protos):
    h = h / jnp.linalg.norm(h, axis=-1, keepdims=True)
    return h @ (protos / jnp.linalg.norm(protos, axis=0, keepdims=True))

  def loss(p):
    return nclip.nclip_loss(logits(xi @ p["wi"] + p["b"], p["protos"]),
                            logits(xt @ p["wt"] + p["b"], p["protos"]), image_temp=0.1,
                            text_temp=0.1, target_temp=0.05, stop_gradient_targets=True,
                            sharp_weight=sharp, smooth_weight=smooth)

  tx = optax.adam(3e-2)

  @jax.jit
  def step(p, s):
    (_, m), g = jax.value_and_grad(loss, has_aux=True)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, m

  state = tx.init(params)
  for _ in range(steps):
    params, state, metrics = step(params, state)
  return {k: float(v) for k, v in metrics.items()}


def test_nclip_collapses_without_regularisers_and_not_with_the_defaults():
  off = _train_collapse_problem(sharp=0.0, smooth=0.0)
  on = _train_collapse_problem(sharp=0.1, smooth=1.0)          # config.nclip defaults
  assert off["nclip_prototypes_used"] <= 4 and off["nclip_mean_entropy"] < 1.0
  assert on["nclip_prototypes_used"] >= 20 and on["nclip_mean_entropy"] > 3.0   # log 32 = 3.47
  assert on["nclip_agreement"] > 0.9                          # still informative, not uniform
