"""DeCLIP's objectives against plain numpy references and hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xclip_jax.objectives import declip, mlm, nns, simsiam


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _np_clip(img, txt, scale):
  logits = scale * img @ txt.T
  return -0.5 * (np.mean(np.diag(_log_softmax(logits, 1))) + np.mean(np.diag(_log_softmax(logits, 0))))


def _np_i2t(img, txt, scale):
  return -np.mean(np.diag(_log_softmax(scale * img @ txt.T, 1)))


# ---- SimSiam ------------------------------------------------------------------------------------


def test_simsiam_matches_numpy_and_stops_gradient_to_targets():
  rng = np.random.default_rng(0)
  p1, z1, p2, z2 = (rng.normal(size=(6, 5)).astype(np.float32) for _ in range(4))
  expected = -0.5 * (np.mean(np.sum(_unit(p1) * _unit(z2), -1)) +
                     np.mean(np.sum(_unit(p2) * _unit(z1), -1)))
  np.testing.assert_allclose(simsiam.simsiam_loss(p1, z1, p2, z2), expected, rtol=1e-6)

  grads = jax.grad(simsiam.simsiam_loss, argnums=(0, 1, 2, 3))(p1, z1, p2, z2)
  assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[3]) == 0)
  assert np.abs(grads[0]).max() > 1e-3 and np.abs(grads[2]).max() > 1e-3
  # Identical directions give the minimum, -1.
  np.testing.assert_allclose(simsiam.simsiam_loss(p1, 3 * p1, p1, 2 * p1), -1.0, rtol=1e-6)


# ---- MLM ----------------------------------------------------------------------------------------


SPEC = dict(mask_id=3, special_ids=(0, 2, 3), first_regular_id=4, vocab_size=50)


def test_masking_follows_the_80_10_10_rule_and_spares_special_tokens():
  rng = np.random.default_rng(0)
  ids = rng.integers(4, 50, size=(400, 64)).astype(np.int32)
  ids[:, 40] = 2
  ids[:, 41:] = 0                                    # eos then padding
  masked, targets, weights = mlm.mask_tokens(jax.random.key(1), jnp.asarray(ids), **SPEC)
  masked, targets, weights = map(np.asarray, (masked, targets, weights))
  np.testing.assert_array_equal(targets, ids)
  selected = weights == 1
  assert not selected[:, 40:].any()                  # eos and padding never selected
  np.testing.assert_array_equal(masked[:, 40:], ids[:, 40:])
  np.testing.assert_array_equal(masked[~selected], ids[~selected])
  n = selected.sum()
  assert abs(n / (400 * 40) - 0.15) < 0.01
  to_mask = (masked == 3) & selected
  changed = (masked != ids) & ~to_mask
  assert abs(to_mask.sum() / n - 0.8) < 0.02
  # 10% random (a few land on the original id by chance: 1/46 of them), 10% unchanged.
  assert abs(changed.sum() / n - 0.1 * 45 / 46) < 0.02
  assert masked[changed].min() >= 4 and masked[changed].max() < 50


def test_mlm_loss_is_cross_entropy_over_masked_positions_only():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(3, 5))
  weights = np.zeros((3, 5), np.float32)
  weights[0, 1] = weights[2, 3] = weights[2, 4] = 1
  log_probs = _log_softmax(logits, -1)
  expected = -np.mean([log_probs[0, 1, targets[0, 1]], log_probs[2, 3, targets[2, 3]],
                       log_probs[2, 4, targets[2, 4]]])
  loss, metrics = mlm.mlm_loss(logits, targets, weights)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert metrics["mlm_tokens"] == 3
  # Unmasked positions do not matter.
  logits[1] += 100 * rng.normal(size=(5, 7))
  np.testing.assert_allclose(mlm.mlm_loss(logits, targets, weights)[0], expected, rtol=1e-6)
  assert mlm.mlm_loss(logits, targets, 0 * weights)[0] == 0


# ---- nearest-neighbour queue --------------------------------------------------------------------


def test_nearest_neighbour_is_the_top_cosine_row():
  rng = np.random.default_rng(2)
  queue = _unit(rng.normal(size=(20, 4))).astype(np.float32)
  queries = rng.normal(size=(5, 4)).astype(np.float32) * 7      # unnormalised: cosine, not dot
  expected = queue[np.argmax(_unit(queries) @ queue.T, axis=1)]
  np.testing.assert_array_equal(nns.nearest_neighbours(queue, queries), expected)


def test_enqueue_is_fifo_and_wraps_around():
  state = {"queue": jnp.zeros((6, 2)), "ptr": jnp.int32(4)}
  items = jnp.arange(8.0).reshape(4, 2)
  out = nns.enqueue(state, items)
  np.testing.assert_array_equal(out["queue"], [[4, 5], [6, 7], [0, 0], [0, 0], [0, 1], [2, 3]])
  assert int(out["ptr"]) == 2
  out = nns.enqueue(out, 10 + jnp.arange(4.0).reshape(2, 2))
  np.testing.assert_array_equal(out["queue"][2:4], [[10, 11], [12, 13]])   # oldest overwritten
  assert int(out["ptr"]) == 4


def test_nns_loss_is_image_to_neighbour_only_and_text_gets_no_gradient():
  rng = np.random.default_rng(3)
  x1, x2 = (_unit(rng.normal(size=(4, 3))).astype(np.float32) for _ in range(2))
  queue = _unit(rng.normal(size=(10, 3))).astype(np.float32)
  t, t_aug = (rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2))
  nn_t, nn_a = queue[np.argmax(t @ queue.T, 1)], queue[np.argmax(t_aug @ queue.T, 1)]
  expected = np.mean([_np_i2t(x, n, 10.0) for x in (x1, x2) for n in (nn_t, nn_a)])

  def loss(t, t_aug):
    neighbours = (nns.nearest_neighbours(queue, t), nns.nearest_neighbours(queue, t_aug))
    return nns.nns_loss((x1, x2), neighbours, 10.0)

  np.testing.assert_allclose(loss(t, t_aug), expected, rtol=1e-5)
  assert all(np.all(np.asarray(g) == 0) for g in jax.grad(loss, argnums=(0, 1))(t, t_aug))


# ---- the combination ----------------------------------------------------------------------------


def test_declip_loss_combines_terms_and_queries_before_enqueueing():
  rng = np.random.default_rng(4)
  b, d, v = 4, 3, 9
  x1, x2, t, ta = (_unit(rng.normal(size=(b, d))).astype(np.float32) for _ in range(4))
  z1, z2, p1, p2 = (rng.normal(size=(b, 5)).astype(np.float32) for _ in range(4))
  logits = rng.normal(size=(b, 6, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, 6))
  weights_mlm = (rng.random((b, 6)) < 0.3).astype(np.float32)
  weights_mlm[0, 0] = 1
  # The queue already holds t exactly: if the query happened after enqueueing, the neighbours
  # would be t itself; they must come from the old queue.
  queue = np.concatenate([_unit(rng.normal(size=(4, d))), t], 0).astype(np.float32)
  outputs = dict(image_emb=x1, image_emb2=x2, text_emb=t, text_emb_aug=ta, logit_scale=np.float32(20),
                 z1=z1, z2=z2, p1=p1, p2=p2, mlm_logits=logits)
  w = {"clip_loss": 0.4, "simsiam_loss": 0.2, "mlm_loss": 0.2, "nns_loss": 0.2}
  total, metrics, new_queue = declip.declip_loss(
      outputs, targets, weights_mlm, {"queue": queue, "ptr": jnp.int32(0)}, w)

  mv = np.mean([_np_clip(x, y, 20.0) for x in (x1, x2) for y in (t, ta)])
  nn_t, nn_a = queue[np.argmax(t @ queue.T, 1)], queue[np.argmax(ta @ queue.T, 1)]
  nns_ref = np.mean([_np_i2t(x, n, 20.0) for x in (x1, x2) for n in (nn_t, nn_a)])
  np.testing.assert_allclose(metrics["clip_loss"], mv, rtol=1e-5)
  np.testing.assert_allclose(metrics["nns_loss"], nns_ref, rtol=1e-5)
  expected = (0.4 * mv + 0.2 * float(simsiam.simsiam_loss(p1, z1, p2, z2)) +
              0.2 * float(mlm.mlm_loss(logits, targets, weights_mlm)[0]) + 0.2 * nns_ref)
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  # Enqueued [t_aug; t] at the pointer, in that order.
  np.testing.assert_allclose(new_queue["queue"][:4], ta, rtol=1e-6)
  np.testing.assert_allclose(new_queue["queue"][4:8], t, rtol=1e-6)
  assert int(new_queue["ptr"]) == 0                 # 8 rows written into a queue of 8


@pytest.mark.parametrize("weight", ["clip_loss", "simsiam_loss", "mlm_loss", "nns_loss"])
def test_zero_weight_removes_a_term(weight):
  rng = np.random.default_rng(5)
  b, d = 4, 3
  embs = [_unit(rng.normal(size=(b, d))).astype(np.float32) for _ in range(4)]
  outputs = dict(zip(("image_emb", "image_emb2", "text_emb", "text_emb_aug"), embs),
                 logit_scale=np.float32(10),
                 **{k: rng.normal(size=(b, 5)).astype(np.float32) for k in ("z1", "z2", "p1", "p2")},
                 mlm_logits=rng.normal(size=(b, 6, 9)).astype(np.float32))
  targets, weights_mlm = rng.integers(0, 9, size=(b, 6)), np.ones((b, 6), np.float32)
  q = {"queue": _unit(rng.normal(size=(16, d))).astype(np.float32), "ptr": jnp.int32(0)}
  w = {"clip_loss": 1.0, "simsiam_loss": 1.0, "mlm_loss": 1.0, "nns_loss": 1.0}
  total, metrics, _ = declip.declip_loss(outputs, targets, weights_mlm, q, w)
  without, _, _ = declip.declip_loss(outputs, targets, weights_mlm, q, dict(w, **{weight: 0.0}))
  np.testing.assert_allclose(total - without, metrics[weight], rtol=1e-5, atol=1e-6)
