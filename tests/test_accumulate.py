"""Gradient accumulation with cached features equals the unaccumulated step."""

import jax
import numpy as np
import pytest

from xclip_jax import accumulate
from xclip_jax.parallel import mesh as mesh_lib

from tests.tiny import tiny_config, tiny_state


def test_micro_batches_are_strided_rows_and_round_trip():
  x = np.arange(12).reshape(12, 1)
  micro = accumulate.to_micro(x, 3)
  np.testing.assert_array_equal(micro[1, :, 0], [1, 4, 7, 10])
  np.testing.assert_array_equal(accumulate.from_micro(micro), x)


def test_accumulated_step_equals_the_full_batch_step():
  rng = np.random.RandomState(0)
  text = rng.randint(4, 200, size=(32, 32)).astype(np.int32)
  text[:, 9], text[:, 10:] = 2, 0
  batch = {"image": rng.normal(size=(32, 32, 32, 3)).astype(np.float32), "text": text}
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2))
  results = {}
  for steps in (1, 4):
    config = tiny_config("", **{"model.image.patch_size": 8, "accum_steps": steps,
                                "batch_size": 32, "optim.eps": 1e-3})
    state, step = tiny_state(mesh, config)
    with jax.set_mesh(mesh):
      for _ in range(2):
        state, m = step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)))
    results[steps] = (float(m["loss"]), float(m["grad_norm"]), jax.device_get(state["params"]))
  np.testing.assert_allclose(results[4][:2], results[1][:2], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(results[4][2]), jax.tree.leaves(results[1][2])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_methods_without_cacheable_losses_are_refused():
  import configs.declip as declip_config
  from xclip_jax import train_state as ts
  from xclip_jax import methods
  c = declip_config.get_config("demo")
  c.accum_steps = 2
  with pytest.raises(ValueError, match="accum_steps=2.*'declip'"):
    ts.make_train_step(None, None, None, methods.get_method("declip"), c)


@pytest.mark.slow
def test_declared_features_and_shared_outputs_give_the_full_batch_gradient():
  # A loss that reads two shared outputs (SigLIP's temperature and bias) besides the features:
  # what the declaration names is all accumulate.py caches, and the gradient is exact.
  import jax.numpy as jnp
  from flax import nnx

  import configs.siglip as siglip_config
  from xclip_jax import methods
  from xclip_jax.objectives import siglip
  c = siglip_config.get_config("demo")
  c.model.update(dict(embed_dim=8))
  c.model.image.update(dict(width=16, layers=1, heads=2, patch_size=16))
  c.model.text.update(dict(width=16, layers=1, heads=2, vocab_size=64))
  graphdef, params, rest = nnx.split(methods.build_model(c, eos_id=2, seed=0), nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  rng = np.random.RandomState(1)
  text = rng.randint(4, 64, size=(16, 8)).astype(np.int32)
  text[:, 5], text[:, 6:] = 2, 0
  batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32), "text": text}

  def loss_of_outputs(out):
    return siglip.siglip_loss(out["image_emb"], out["text_emb"], out["logit_scale"],
                              out["logit_bias"])

  def full_loss(p):
    return loss_of_outputs(nnx.merge(graphdef, p, rest)(batch))

  (loss, _), grads = jax.value_and_grad(full_loss, has_aux=True)(params)
  (acc_loss, _), acc_grads = jax.jit(lambda p: accumulate.accumulated_value_and_grad(
      graphdef, p, rest, batch, 4, loss_of_outputs, ("image_emb", "text_emb"),
      ("logit_scale", "logit_bias")))(params)
  np.testing.assert_allclose(acc_loss, loss, rtol=1e-6)
  assert abs(float(grads["logit_bias"])) > 1e-3 and abs(float(grads["logit_scale"])) > 1e-3
  for a, b in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  assert jnp.asarray(acc_grads["logit_bias"]).shape == ()
