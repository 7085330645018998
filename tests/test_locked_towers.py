"""Locked towers and the other fine-tuning controls through the sharded train step: a locked
tower (LiT) stays bitwise equal and carries no optimizer state, no backward pass runs into frozen
parameters, and lock + lr_mults + layer_decay + frozen patch embedding + big_vision decay + a
schedule compose on 8 devices with FSDP, the moments sharded like their parameters."""

import jax
import numpy as np
import pytest

from xclip_jax import optim, param_groups
from xclip_jax import config as config_lib
from xclip_jax import train_state as ts
from xclip_jax import methods
from xclip_jax.parallel import mesh as mesh_lib

from tests.test_frozen_params import _batch
from tests.tiny import tiny_config


def _state_and_step(config, mesh, **step_kw):
  config_lib.validate(config)
  graphdef, params, rest = mesh_lib.create_sharded(
      lambda: methods.build_model(config, eos_id=2, seed=0), mesh)
  tx, schedule = optim.make_optimizer(config, params)
  state = ts.init_train_state(params, rest, tx, mesh, seed=0)
  step = ts.make_train_step(graphdef, tx, schedule, methods.get_method("clip"), config,
                            **step_kw)
  return state, step, tx


def _moments(opt_state):
  """{'/'-path of the parameter: leaf} of Adam's mu and nu in an optimizer state."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    names = [getattr(k, "name", None) for k in path]
    for moment in ("mu", "nu"):
      if moment in names:
        rest = path[names.index(moment) + 1:]
        out[f"{moment}:{param_groups.path_name(rest)}"] = leaf
  return out


def _check_moments_sharded_like_params(state, skip_prefixes):
  params = {param_groups.path_name(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  moments = _moments(state["opt_state"])
  expected = {f"{m}:{name}" for name in params for m in ("mu", "nu")
              if not name.startswith(skip_prefixes)}
  assert set(moments) == expected            # frozen parameters: no moments at all
  for key, leaf in moments.items():
    assert leaf.sharding == params[key.split(":", 1)[1]].sharding, key
  assert any("fsdp" in str(leaf.sharding.spec) for leaf in moments.values())


def _run(state, step, mesh, steps=3):
  jitted = ts.jit_train_step(step, ts.shardings_of(state), mesh_lib.batch_sharding(mesh), mesh)
  with jax.set_mesh(mesh):
    for seed in range(steps):
      state, metrics = jitted(state, jax.device_put(_batch(seed), mesh_lib.batch_sharding(mesh)))
  assert int(metrics["skipped"]) == 0
  return state


def _moved(before, after, prefix):
  return {name: float(np.abs(after[name] - before[name]).max())
          for name in before if name.startswith(prefix)}


def _flat(tree):
  return {param_groups.path_name(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


@pytest.mark.slow
def test_lit_locked_image_tower_is_bitwise_unchanged_without_optimizer_state_on_8_devices():
  config = tiny_config("", **{"model.image.patch_size": 8, "optim.lr": 1e-2,
                              "optim.locked_tower": "image"})
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2))
  state, step, _ = _state_and_step(config, mesh)
  _check_moments_sharded_like_params(state, skip_prefixes=("image/",))
  before = _flat(state["params"])
  after = _flat(_run(state, step, mesh)["params"])
  for name, change in _moved(before, after, "image/").items():
    assert change == 0, name                                   # the whole tower, projection too
  text = _moved(before, after, "text/")
  assert min(text.values()) > 1e-3, text                      # Adam's steps are ~lr
  assert abs(after["logit_scale"] - before["logit_scale"]) > 1e-3    # the temperature trains


@pytest.mark.slow
def test_lock_lr_mults_layer_decay_frozen_patch_embed_and_schedule_compose_on_8_devices():
  config = tiny_config("", **{
      "model.image.patch_size": 8, "model.image.freeze_patch_embed": True,
      "optim.locked_tower": "text", "optim.layer_decay": 0.5,
      "optim.lr_mults": (("image/transformer/blocks/mlp/.*", 3.0), ("logit_scale", 0.0)),
      "optim.decay_convention": "big_vision", "optim.weight_decay": 1e-4, "optim.lr": 1e-2,
      "optim.schedule": "rsqrt", "optim.cooldown_steps": 1, "optim.grad_clip_norm": 1.0})
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=4))
  state, step, tx = _state_and_step(config, mesh)
  _check_moments_sharded_like_params(state, ("text/", "image/patch_embed/", "logit_scale"))
  before = _flat(state["params"])

  # The sharded optimizer computes what the same optimizer computes on one device.
  rng = np.random.RandomState(0)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), before)
  grads = jax.tree.map(lambda g, p: jax.device_put(g, p.sharding),
                       jax.tree_util.tree_unflatten(jax.tree.structure(state["params"]),
                                                    list(grads.values())), state["params"])
  with jax.set_mesh(mesh):
    sharded, _ = jax.jit(tx.update)(grads, state["opt_state"], state["params"])
  host = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))
  single, _ = tx.update(host(grads), host(state["opt_state"]), host(state["params"]))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(sharded))[0],
                          jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-10, err_msg=jax.tree_util.keystr(path))

  after = _flat(_run(state, step, mesh)["params"])
  for prefix in ("text/", "image/patch_embed/", "logit_scale"):
    for name, change in _moved(before, after, prefix).items():
      assert change == 0, name
  image = _moved(before, after, "image/")
  assert min(v for k, v in image.items() if "patch_embed" not in k) > 0, image


def _primitive_counts(jaxpr, counts=None):
  """{primitive name: count} over a jaxpr and every jaxpr nested in it (scan bodies, ...)."""
  counts = {} if counts is None else counts
  for eqn in jaxpr.eqns:
    counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _primitive_counts(inner, counts)
  return counts


@pytest.fixture(scope="module")
def abstract_state():
  """The train state's shapes and shardings on one device: built once, since the lock changes
  only the optimizer state, which each case replaces by its own abstract one."""
  mesh = mesh_lib.make_mesh(dict(data=1), devices=jax.devices()[:1])
  state, _, _ = _state_and_step(tiny_config("", **{"model.image.patch_size": 8}), mesh)
  return mesh, ts.abstract_of(state)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_no_backward_pass_runs_into_frozen_parameters(abstract_state, accum_steps):
  """The image tower's one conv (the patch embedding) appears once more in the step's program for
  its kernel gradient, and its scanned blocks once more for their backward pass; frozen, neither
  appears. (The images need no gradient, so no conv computes one.)"""
  mesh, base = abstract_state
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(0))

  def counts(stop_frozen_gradients=True, **overrides):
    config = tiny_config("", **{"model.image.patch_size": 8, "accum_steps": accum_steps,
                                **overrides})
    config_lib.validate(config)
    graphdef = mesh_lib.abstract_model(
        lambda: methods.build_model(config, eos_id=2, seed=0), mesh)[0]
    tx, schedule = optim.make_optimizer(config, base["params"])
    state = dict(base, opt_state=jax.eval_shape(tx.init, base["params"]))
    step = ts.make_train_step(graphdef, tx, schedule, methods.get_method("clip"), config,
                              stop_frozen_gradients=stop_frozen_gradients)
    with jax.set_mesh(mesh):
      c = _primitive_counts(jax.make_jaxpr(step)(state, batch).jaxpr)
    return c.get("conv_general_dilated", 0), c.get("scan", 0)

  trained_conv, trained_scans = counts()
  forward_convs = accum_steps                  # accumulation encodes each micro-batch twice
  assert trained_conv == forward_convs + 1
  locked_conv, locked_scans = counts(**{"optim.locked_tower": "image"})
  assert locked_conv == forward_convs
  assert locked_scans == trained_scans - 1     # no backward scan over the image blocks
  assert counts(**{"model.image.freeze_patch_embed": True})[0] == forward_convs
  # The text tower locked: the image tower's backward pass stays, the text blocks' goes.
  assert counts(**{"optim.locked_tower": "text"}) == (trained_conv, trained_scans - 1)
  # set_to_zero alone discards the gradient XLA still computes.
  assert counts(False, **{"optim.locked_tower": "image"}) == (trained_conv, trained_scans)
