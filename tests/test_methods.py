"""Every registered method's objective by value: each combination against its objectives called
directly on fixed inputs; contrastive.impl=chunked against the global loss wherever a method has a
CLIP term (values and gradients, 8 devices); options a method ignores are errors; and each
method's full sharded train step on 8 devices equal to 1 device."""

import jax
import numpy as np
import pytest

from xclip_jax import config as config_lib
from xclip_jax import methods, optim
from xclip_jax import train_state as ts
from xclip_jax.objectives import clip, declip, mlm, nclip, nns, siglip, simclr, simsiam
from xclip_jax.data import text_spec
from xclip_jax.parallel import mesh as mesh_lib

import configs.clip, configs.declip, configs.nclip, configs.siglip, configs.slip  # noqa: E401
import configs.xclip

CONFIGS = {"clip": configs.clip, "declip": configs.declip, "nclip": configs.nclip,
           "xclip": configs.xclip, "siglip": configs.siglip, "slip": configs.slip}
TEXT_SPEC = text_spec.TextSpec.reserved(200)     # pad 0, eos 2, mask 3, pieces from 4
B, D, K = 16, 8, 12


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _fixed(seed=0):
  """Model outputs, batch entries and method state of every method, as fixed arrays."""
  rng = np.random.default_rng(seed)
  unit = lambda: _unit(rng.normal(size=(B, D)))
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  image, text = unit(), unit()
  text[:6] = _unit(image[:6] + 0.3 * rng.normal(size=(6, D)))     # some pairs match
  outputs = dict(image_emb=image, text_emb=text, image_emb2=unit(), text_emb_aug=unit(),
                 logit_scale=np.float32(12.0), logit_bias=np.float32(-3.0),
                 image_proto_logits=normal(B, K), text_proto_logits=normal(B, K),
                 ssl_z1=normal(B, 6), ssl_z2=normal(B, 6),
                 z1=normal(B, 5), z2=normal(B, 5), p1=normal(B, 5), p2=normal(B, 5),
                 mlm_logits=normal(B, 7, 11))
  weights = (rng.random((B, 7)) < 0.3).astype(np.float32)
  weights[0, 0] = 1
  batch = dict(mlm_targets=rng.integers(0, 11, size=(B, 7)).astype(np.int32),
               mlm_weights=weights)
  queue = {"queue": _unit(rng.normal(size=(64, D))), "ptr": np.int32(8)}
  return outputs, batch, queue


def _config(name, **fields):
  c = CONFIGS[name].get_config("demo")
  c.update_from_flattened_dict(fields) if fields else None
  return c


def _objective(name, config, outputs, batch, queue):
  state = queue if name == "declip" else {}
  return methods.get_method(name).objective(outputs, batch, config, state)


def _nclip_reference(outputs, c):
  return nclip.nclip_loss(outputs["image_proto_logits"], outputs["text_proto_logits"],
                          image_temp=c.image_temp, text_temp=c.text_temp,
                          target_temp=c.target_temp, stop_gradient_targets=c.stop_gradient_targets,
                          sharp_weight=c.sharp_weight, smooth_weight=c.smooth_weight)[0]


def test_clip_and_siglip_objectives_are_their_losses():
  out, batch, queue = _fixed()
  loss, metrics, _ = _objective("clip", _config("clip"), out, batch, queue)
  np.testing.assert_allclose(loss, clip.clip_loss(out["image_emb"], out["text_emb"], 12.0)[0],
                             rtol=1e-6)
  loss, metrics, _ = _objective("siglip", _config("siglip"), out, batch, queue)
  np.testing.assert_allclose(loss, siglip.siglip_loss(out["image_emb"], out["text_emb"], 12.0,
                                                      -3.0)[0], rtol=1e-6)
  assert metrics["logit_bias"] == -3.0


def test_nclip_and_xclip_weights_combine_the_terms():
  out, batch, queue = _fixed(1)
  c = _config("xclip", **{"nclip.clip_weight": 0.25, "nclip.nclip_weight": 1.5,
                          "nclip.sharp_weight": 0.4, "nclip.image_temp": 0.2})
  clip_value = float(clip.clip_loss(out["image_emb"], out["text_emb"], 12.0)[0])
  nclip_value = float(_nclip_reference(out, c.nclip))
  loss, metrics, _ = _objective("xclip", c, out, batch, queue)
  np.testing.assert_allclose(loss, 0.25 * clip_value + 1.5 * nclip_value, rtol=1e-6)
  np.testing.assert_allclose([metrics["clip_loss"], metrics["nclip_loss"]],
                             [clip_value, nclip_value], rtol=1e-6)
  # nCLIP trains its loss alone; CLIP's is only logged, and no gradient reaches the embeddings.
  c = _config("nclip", **{"nclip.sharp_weight": 0.4, "nclip.image_temp": 0.2})
  loss, metrics, _ = _objective("nclip", c, out, batch, queue)
  np.testing.assert_allclose(loss, nclip_value, rtol=1e-6)
  np.testing.assert_allclose(metrics["clip_loss_untrained"], clip_value, rtol=1e-6)
  grads = jax.grad(lambda o: _objective("nclip", c, o, batch, queue)[0])(out)
  assert not np.any(grads["image_emb"]) and not np.any(grads["logit_scale"])


def test_slip_is_clip_plus_weighted_simclr():
  out, batch, queue = _fixed(2)
  c = _config("slip", **{"slip.ssl_weight": 0.7, "slip.ssl_temperature": 0.2})
  clip_value = float(clip.clip_loss(out["image_emb"], out["text_emb"], 12.0)[0])
  ssl_value = float(simclr.nt_xent_loss(out["ssl_z1"], out["ssl_z2"], 0.2)[0])
  loss, metrics, _ = _objective("slip", c, out, batch, queue)
  np.testing.assert_allclose(loss, clip_value + 0.7 * ssl_value, rtol=1e-6)
  np.testing.assert_allclose([metrics["clip_loss"], metrics["ssl_loss"]], [clip_value, ssl_value],
                             rtol=1e-6)


def test_declip_is_its_weighted_sum_of_terms():
  out, batch, queue = _fixed(3)
  c = _config("declip", **{"declip.clip_weight": 0.3, "declip.simsiam_weight": 0.5,
                           "declip.mlm_weight": 0.7, "declip.nns_weight": 0.9})
  images = (out["image_emb"], out["image_emb2"])
  texts = (out["text_emb"], out["text_emb_aug"])
  mv = float(declip.multi_view_loss(images, texts, 12.0)[0])
  np.testing.assert_allclose(mv, np.mean([clip.clip_loss(x, t, 12.0)[0] for x in images
                                          for t in texts]), rtol=1e-6)
  ss = float(simsiam.simsiam_loss(out["p1"], out["z1"], out["p2"], out["z2"]))
  ml = float(mlm.mlm_loss(out["mlm_logits"], batch["mlm_targets"], batch["mlm_weights"])[0])
  neighbours = tuple(nns.nearest_neighbours(queue["queue"], t) for t in texts)
  nn = float(nns.nns_loss(images, neighbours, 12.0))
  loss, metrics, new_queue = _objective("declip", c, out, batch, queue)
  np.testing.assert_allclose(loss, 0.3 * mv + 0.5 * ss + 0.7 * ml + 0.9 * nn, rtol=1e-6)
  np.testing.assert_allclose([metrics[k] for k in ("clip_loss", "simsiam_loss", "mlm_loss",
                                                   "nns_loss")], [mv, ss, ml, nn], rtol=1e-6)
  assert int(new_queue["ptr"]) == (8 + 2 * B) % 64


# Per method: the logged CLIP terms, and how many CLIP terms it computes (DeCLIP: 4 multi-view
# pairs + 4 image -> neighbour halves).
CHUNKED_METHODS = {"clip": (("clip_loss",), 1), "declip": (("clip_loss", "nns_loss"), 8),
                   "nclip": (("clip_loss_untrained",), 1), "xclip": (("clip_loss",), 1),
                   "slip": (("clip_loss",), 1)}


@pytest.mark.parametrize("name", sorted(CHUNKED_METHODS))
def test_chunked_clip_terms_equal_the_global_ones(name):
  out, batch, queue = _fixed(4)
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2))
  rows = mesh_lib.batch_sharding(mesh)
  float_keys = [k for k, v in out.items() if np.ndim(v) >= 2]
  results = {}
  for impl in ("global", "chunked"):
    c = _config(name, **{"contrastive.impl": impl, "contrastive.chunk": 4})

    def loss_fn(float_outputs):
      loss, metrics, _ = _objective(name, c, {**out, **float_outputs}, batch, queue)
      return loss, metrics

    with jax.set_mesh(mesh):
      sharded = {k: jax.device_put(out[k], rows) for k in float_keys}
      (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(sharded)
      # Every CLIP term of the chunked run takes the shard_map path (the global run none).
      terms, count = CHUNKED_METHODS[name]
      calls = str(jax.make_jaxpr(loss_fn)(sharded)).count("shard_map[")
      assert calls == (count if impl == "chunked" else 0)
    results[impl] = (float(loss), {k: float(metrics[k]) for k in terms}, jax.device_get(grads))
  (loss_g, terms_g, grads_g), (loss_c, terms_c, grads_c) = results["global"], results["chunked"]
  np.testing.assert_allclose(loss_c, loss_g, rtol=1e-5)
  for key in terms_g:
    np.testing.assert_allclose(terms_c[key], terms_g[key], rtol=1e-5, err_msg=key)
  assert any(np.abs(g).max() > 1e-3 for g in jax.tree.leaves(grads_g))
  for key in float_keys:
    np.testing.assert_allclose(grads_c[key], grads_g[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_options_a_method_ignores_are_errors():
  c = configs.siglip.get_config("demo")
  c.contrastive.impl = "chunked"
  with pytest.raises(ValueError, match="contrastive.impl='chunked' has no effect on method "
                                       "'siglip'.*siglip.impl=ring"):
    config_lib.validate(c)
  c = configs.xclip.get_config("demo")
  c.siglip.impl = "ring"
  with pytest.raises(ValueError, match="siglip.impl='ring' has no effect on method 'xclip'"):
    config_lib.validate(c)
  for name in sorted(CHUNKED_METHODS):
    c = CONFIGS[name].get_config("demo")
    c.contrastive.impl = "chunked"
    config_lib.validate(c)
  c = configs.siglip.get_config("demo")
  c.siglip.impl = "ring"
  config_lib.validate(c)


# ---- the whole train step ---------------------------------------------------------------------


def _tiny(name):
  c = CONFIGS[name].get_config("demo")
  c.batch_size = 16
  c.model.embed_dim = 16
  c.model.image.update(dict(width=32, layers=1, heads=2, patch_size=16))
  c.model.text.update(dict(width=32, layers=1, heads=2, vocab_size=200))
  c.nclip.update(dict(prototypes=64, hidden=32, bottleneck=16))
  c.slip.update(dict(mlp_dim=32, embed_dim=16))
  c.optim.update(dict(warmup_steps=1, lr=1e-2, eps=1e-3))
  return c


def _batches(method, steps=2):
  rng = np.random.RandomState(0)
  out = []
  for _ in range(steps):
    batch = {v.key: rng.randint(0, 256, size=(16, 32, 32, 3)).astype(np.uint8)
             for v in method.views.image}
    for v in method.views.text:
      text = rng.randint(4, 200, size=(16, 32)).astype(np.int32)
      text[:, 9], text[:, 10:] = 2, 0
      batch[v.key] = text
    out.append(batch)
  return out


def _trajectory(name, mesh):
  c = _tiny(name)
  method = methods.get_method(name)
  graphdef, params, rest = mesh_lib.create_sharded(
      lambda: methods.build_model(c, eos_id=2, seed=0), mesh)
  tx, schedule = optim.make_optimizer(c, params)
  state = ts.init_train_state(params, rest, tx, mesh, 0)
  step = ts.jit_train_step(ts.make_train_step(graphdef, tx, schedule, method, c, TEXT_SPEC),
                           ts.shardings_of(state), mesh_lib.batch_sharding(mesh), mesh)
  metrics = []
  with jax.set_mesh(mesh):
    for batch in _batches(method, 3):
      state, m = step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)))
      metrics.append(jax.device_get(m))
  return metrics


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nclip", "siglip", "slip", "xclip"])
def test_sharded_step_equals_one_device_per_method(name):
  eight = _trajectory(name, mesh_lib.make_mesh(dict(data=4, fsdp=2)))
  one = _trajectory(name, mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1),
                                             devices=jax.devices()[:1]))
  keys = {"nclip": ("loss", "nclip_mean_entropy", "clip_loss_untrained"),
          "xclip": ("loss", "clip_loss", "nclip_loss"), "siglip": ("loss", "logit_bias"),
          "slip": ("loss", "clip_loss", "ssl_loss")}[name]
  for key in keys:
    np.testing.assert_allclose([m[key] for m in eight], [m[key] for m in one], rtol=2e-5,
                               atol=1e-6, err_msg=key)
  assert all(int(m["skipped"]) == 0 for m in eight)
  assert eight[0]["loss"] != eight[-1]["loss"]                        # the parameters moved
  if name == "siglip":
    np.testing.assert_allclose(one[0]["logit_scale"], 10.0, rtol=1e-5)   # t = exp(log 10)
    np.testing.assert_allclose(one[0]["logit_bias"], -10.0, rtol=1e-5)
