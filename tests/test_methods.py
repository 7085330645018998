"""Every registered method's model and objective through one sharded train step (8 devices)."""

import jax
import numpy as np
import pytest

from xclip_jax import optim
from xclip_jax import train_state as ts
from xclip_jax.data import synthetic
from xclip_jax.models import two_tower
from xclip_jax.objectives import registry
from xclip_jax.parallel import mesh as mesh_lib

import configs.nclip, configs.siglip, configs.slip, configs.xclip  # noqa: E401

CONFIGS = {"nclip": configs.nclip, "xclip": configs.xclip, "siglip": configs.siglip,
           "slip": configs.slip}
TEXT_SPEC = dict(vocab_size=200, pad_id=0, eos_id=2, mask_id=3, first_regular_id=4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_sharded_step_per_method(name):
  c = CONFIGS[name].get_config("demo")
  c.batch_size = 16
  c.model.embed_dim = 16
  c.model.image.update(dict(width=32, layers=1, heads=2, patch_size=16))
  c.model.text.update(dict(width=32, layers=1, heads=2, vocab_size=200))
  c.nclip.update(dict(prototypes=64, hidden=32, bottleneck=16))
  c.slip.update(dict(mlp_dim=32, embed_dim=16))
  method = registry.get_method(name)
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2))
  graphdef, params, rest = mesh_lib.create_sharded(
      lambda: two_tower.build_model(c, eos_id=2, seed=0), mesh)
  tx, schedule = optim.make_optimizer(c, params)
  state = ts.init_train_state(params, rest, tx, mesh, 0)
  step = ts.jit_train_step(ts.make_train_step(graphdef, tx, schedule, method, c, TEXT_SPEC),
                           ts.shardings_of(state), mesh_lib.batch_sharding(mesh), mesh)
  batch = synthetic.global_batch(c, 0, method.views)
  with jax.set_mesh(mesh):
    state, m = step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)))
  assert np.isfinite(float(m["loss"])) and int(m["skipped"]) == 0
  expected = {"nclip": "nclip_mean_entropy", "xclip": "clip_loss", "siglip": "logit_bias",
              "slip": "ssl_loss"}[name]
  assert expected in m
  if name == "siglip":
    np.testing.assert_allclose(float(m["logit_scale"]), 10.0, rtol=1e-5)   # t = exp(log 10)
    np.testing.assert_allclose(float(m["logit_bias"]), -10.0, rtol=1e-5)
