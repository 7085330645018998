"""The logit scale: the forward cap keeps its gradient, each method's parameter range is applied
after every update (methods.Method.constrain_params), and the parameter can come back down."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xclip_jax import methods
from xclip_jax.parallel import mesh as mesh_lib

import configs.clip as clip_config
import configs.declip as declip_config
import configs.siglip as siglip_config
import configs.slip as slip_config
from tests.tiny import tiny_config, tiny_state


def _tiny_model(config):
  config.model.update(dict(embed_dim=8))
  config.model.image.update(dict(width=16, layers=1, heads=2, patch_size=16))
  config.model.text.update(dict(width=16, layers=1, heads=2))
  return methods.build_model(config, eos_id=2, seed=0)


@pytest.mark.parametrize("param", [math.log(50.0), math.log(100.0), 5.0, 6.0])
def test_scale_is_capped_and_its_gradient_never_vanishes(param):
  graphdef, params, rest = nnx.split(_tiny_model(clip_config.get_config("demo")), nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def scale_of(s):
    return nnx.merge(graphdef, dict(params, logit_scale=s), rest).scale()

  value, grad = jax.value_and_grad(scale_of)(jnp.float32(param))
  expected = min(math.exp(param), 100.0)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  # d scale / d s = the scale itself, at and above the cap too (a jnp.minimum cap gives 0 there).
  np.testing.assert_allclose(grad, expected, rtol=1e-5)


def test_each_method_names_its_reference_range():
  np.testing.assert_allclose(methods.base.logit_scale_range(clip_config.get_config("vit_b32")),
                             (0.0, math.log(100.0)))
  np.testing.assert_allclose(methods.base.logit_scale_range(slip_config.get_config("vit_b16")),
                             (0.0, math.log(100.0)))
  assert methods.base.logit_scale_range(declip_config.get_config("vit_b32")) == (3.0, 6.0)
  assert methods.base.logit_scale_range(declip_config.get_config("demo")) == (0.0, math.log(100.0))
  params = {"logit_scale": jnp.float32(9.0), "other": jnp.ones(2)}
  for name, config, value in (("clip", clip_config.get_config("demo"), math.log(100.0)),
                              ("declip", declip_config.get_config("vit_b32"), 6.0),
                              ("siglip", siglip_config.get_config("demo"), 9.0)):
    out = methods.get_method(name).constrain_params(params, config)
    np.testing.assert_allclose(out["logit_scale"], value, rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(out["other"], params["other"])
  out = methods.get_method("declip").constrain_params(
      dict(params, logit_scale=jnp.float32(-1.0)), declip_config.get_config("vit_b32"))
  assert float(out["logit_scale"]) == 3.0


def _batch(seed):
  rng = np.random.RandomState(seed)
  text = rng.randint(4, 200, size=(16, 32)).astype(np.int32)
  text[:, 9], text[:, 10:] = 2, 0
  return {"image": rng.uniform(0, 255, size=(16, 32, 32, 3)).astype(np.uint8), "text": text}


def _set(state, **values):
  """The state with the named scalar parameters / counters replaced (same shardings)."""
  params = dict(state["params"])
  for key, value in values.items():
    target = state if key == "step" else params
    target_value = jax.device_put(jnp.asarray(value, target[key].dtype), target[key].sharding)
    target[key] = target_value
  return dict(state, params=params)


@pytest.mark.slow
def test_the_parameter_comes_back_down_from_the_cap_and_stays_in_range():
  # DeCLIP's recipe range [3, 6] reaches above the cap (ln 100 = 4.61): at 5.0 the forward scale
  # is 100. Random towers make large scales costly, so the gradient pushes the parameter down:
  # with a gradient-free cap it would sit at 5.0 for good.
  mesh = mesh_lib.make_mesh(dict(data=8))
  state, step = tiny_state(mesh, tiny_config("", **{
      "model.image.patch_size": 8, "optim.lr": 1e-2, "optim.warmup_steps": 1,
      "optim.grad_clip_norm": 0.0, "model.logit_scale_range": (3.0, 6.0)}))
  state = _set(state, logit_scale=5.0)
  values = []
  with jax.set_mesh(mesh):
    for seed in range(3):
      state, metrics = step(state, jax.device_put(_batch(seed), mesh_lib.batch_sharding(mesh)))
      values.append(float(state["params"]["logit_scale"]))
    assert float(metrics["logit_scale"]) == pytest.approx(100.0)
    # Step 0 runs at warmup's lr 0; then Adam moves the parameter by about lr per step.
    assert values[0] == 5.0 and 5.0 - 0.035 < values[2] < values[1] < 5.0 - 0.005
    # Just above the bottom of the range, a step of ~lr down is clamped at 3.
    state = _set(state, logit_scale=3.001, step=1)
    state, _ = step(state, jax.device_put(_batch(0), mesh_lib.batch_sharding(mesh)))
    assert float(state["params"]["logit_scale"]) == 3.0
