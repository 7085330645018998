"""clip_loss against a plain numpy reference, and 1-device vs 8-device (data x fsdp) parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from xclip_jax.objectives import clip


def _normalised(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_clip_loss(img, txt, scale):
  """Textbook symmetric InfoNCE with explicit loops over rows and columns."""
  logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
  n = logits.shape[0]
  i2t = t2i = 0.0
  for i in range(n):
    row, col = logits[i], logits[:, i]
    i2t += -(row[i] - np.log(np.sum(np.exp(row - row.max()))) - row.max())
    t2i += -(col[i] - np.log(np.sum(np.exp(col - col.max()))) - col.max())
  return 0.5 * (i2t + t2i) / n


@pytest.mark.parametrize("n,d,scale", [(8, 4, 1.0), (32, 16, 14.285), (64, 8, 100.0)])
def test_matches_numpy_reference(n, d, scale):
  rng = np.random.default_rng(n + d)
  img, txt = _normalised(rng, n, d), _normalised(rng, n, d)
  loss, metrics = clip.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(scale))
  np.testing.assert_allclose(float(loss), numpy_clip_loss(img, txt, scale), rtol=2e-5, atol=1e-5)
  logits = img @ txt.T
  np.testing.assert_allclose(float(metrics["acc_i2t"]), np.mean(logits.argmax(1) == np.arange(n)))
  np.testing.assert_allclose(float(metrics["acc_t2i"]), np.mean(logits.argmax(0) == np.arange(n)))


def test_hand_computed_two_pairs():
  # Orthogonal pairs at scale s: each row is softmax([s, 0]) -> loss = log(1 + e^-s).
  img = jnp.eye(2)
  s = 3.0
  loss, metrics = clip.clip_loss(img, img, jnp.float32(s))
  np.testing.assert_allclose(float(loss), np.log1p(np.exp(-s)), rtol=1e-6)
  assert float(metrics["acc_i2t"]) == 1.0 and float(metrics["acc_t2i"]) == 1.0


def test_loss_is_symmetric_in_directions():
  rng = np.random.default_rng(0)
  img, txt = _normalised(rng, 16, 8), _normalised(rng, 16, 8)
  a, _ = clip.clip_loss(img, txt, 10.0)
  b, _ = clip.clip_loss(txt, img, 10.0)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_perfect_alignment_beats_shuffled():
  rng = np.random.default_rng(1)
  img = _normalised(rng, 16, 32)
  good, _ = clip.clip_loss(img, img, 50.0)
  bad, _ = clip.clip_loss(img, img[::-1], 50.0)
  assert float(good) < 0.01 < float(bad)


@pytest.mark.parametrize("shape", [(2, 4), (4, 2), (8, 1)])
def test_sharded_loss_and_grads_equal_single_device(shape):
  rng = np.random.default_rng(7)
  img, txt = _normalised(rng, 64, 16), _normalised(rng, 64, 16)
  scale = jnp.float32(14.0)

  def loss_fn(img, txt, scale):
    return clip.clip_loss(img, txt, scale)[0]
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))

  single = jax.jit(grad_fn)
  ref_loss, ref_grads = single(jax.device_put(img, jax.devices()[0]),
                               jax.device_put(txt, jax.devices()[0]), scale)

  mesh = jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  img_s, txt_s = jax.device_put(img, rows), jax.device_put(txt, rows)
  assert len(img_s.sharding.device_set) == 8
  sharded = jax.jit(grad_fn, in_shardings=(rows, rows, NamedSharding(mesh, P())))
  loss, grads = sharded(img_s, txt_s, scale)

  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)
  # The gradient stays sharded like its input: no full B x D copy per device.
  assert grads[0].sharding.is_equivalent_to(rows, 2)
