"""Frozen parameters through the sharded train step: DeCLIP's frozen patch embedding stays bitwise
equal to its initialisation, everything else trains, and it carries no optimizer state."""

import jax
import numpy as np
import pytest

from xclip_jax.parallel import mesh as mesh_lib

import configs.declip as declip_config
from tests.tiny import tiny_config, tiny_state


def _batch(seed):
  rng = np.random.RandomState(seed)
  text = rng.randint(4, 200, size=(16, 32)).astype(np.int32)
  text[:, 9], text[:, 10:] = 2, 0
  return {"image": rng.uniform(0, 255, size=(16, 32, 32, 3)).astype(np.uint8), "text": text}


@pytest.mark.slow
def test_frozen_patch_embedding_is_bitwise_unchanged_and_has_no_optimizer_state():
  config = tiny_config("", **{"model.image.patch_size": 8, "model.image.freeze_patch_embed": True,
                              "optim.lr": 1e-2})
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2))
  state, step = tiny_state(mesh, config)
  before = jax.device_get(state["params"])
  opt_paths = [jax.tree_util.keystr(p)
               for p, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
  assert opt_paths and not [p for p in opt_paths if "patch_embed" in p]
  with jax.set_mesh(mesh):
    for seed in range(3):
      state, metrics = step(state, jax.device_put(_batch(seed), mesh_lib.batch_sharding(mesh)))
  assert int(metrics["skipped"]) == 0
  after = jax.device_get(state["params"])
  np.testing.assert_array_equal(after["image"]["patch_embed"]["kernel"],
                                before["image"]["patch_embed"]["kernel"])
  # Everything else moved (Adam's steps are ~lr).
  for name in ("pos_embedding", "class_embedding", "projection"):
    assert np.abs(after["image"][name] - before["image"][name]).max() > 1e-3, name
  assert np.abs(after["text"]["projection"] - before["text"]["projection"]).max() > 1e-3


def test_declip_paper_recipe_freezes_the_patch_embedding_and_the_demo_does_not():
  assert declip_config.get_config("vit_b32").model.image.freeze_patch_embed is True
  assert declip_config.get_config("demo").model.image.freeze_patch_embed is False
