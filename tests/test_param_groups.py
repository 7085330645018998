"""Fine-tuning controls in the optimiser (param_groups.py): learning-rate multipliers and the ViT's
layer-wise lr decay against Adam written out in numpy, under both weight-decay conventions; a
multiplier of 0 as a freeze; pattern rules; the config checks; the command-line forms."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs import clip as clip_config
from xclip_jax import config as config_lib
from xclip_jax import optim, param_groups, resume
from xclip_jax import methods

B1, B2, EPS = 0.9, 0.98, 1e-8


def _config(**optim_fields):
  c = clip_config.get_config("demo")
  c.total_steps = 10
  c.optim.update(dict(lr=0.1, min_lr=0.0, warmup_steps=1, schedule="constant", b1=B1, b2=B2,
                      eps=EPS, grad_clip_norm=0.0))
  c.optim.update(optim_fields)
  return c


def _params():
  rng = np.random.RandomState(0)
  return {"image": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
          "text": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
          "logit_scale": jnp.float32(2.6)}


def _grads(params, step):
  rng = np.random.RandomState(100 + step)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def _adam_reference(config, params, steps, mult, decays):
  """Numpy AdamW over `steps` steps; `mult` and `decays` map a '/'-path to the multiplier and
  whether it decays. Returns the last step's updates."""
  schedule = optim.learning_rate_schedule(config.optim, config.total_steps)
  lr, wd = config.optim.lr, config.optim.weight_decay
  flat = {param_groups.path_name(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  m = {k: np.zeros_like(v) for k, v in flat.items()}
  v2 = {k: np.zeros_like(v) for k, v in flat.items()}
  for t in range(steps):
    grads = {param_groups.path_name(k): np.asarray(g)
             for k, g in jax.tree_util.tree_flatten_with_path(_grads(params, t))[0]}
    lr_t = float(schedule(t))
    updates = {}
    for k, p in flat.items():
      m[k] = B1 * m[k] + (1 - B1) * grads[k]
      v2[k] = B2 * v2[k] + (1 - B2) * grads[k]**2
      adam = (m[k] / (1 - B1**(t + 1))) / (np.sqrt(v2[k] / (1 - B2**(t + 1))) + EPS)
      decay = p if decays(k) else 0.0
      if config.optim.decay_convention == "adamw":      # a group's lr scales its decay
        updates[k] = -lr_t * mult(k) * (adam + wd * decay)
      else:                                              # big_vision: decay after lr_mults
        updates[k] = -lr_t * (mult(k) * adam + wd / lr * decay)
      flat[k] = p + updates[k]
  return updates


def _optax_updates(config, params, steps):
  tx, _ = optim.make_optimizer(config, params)
  state = tx.init(params)
  for t in range(steps):
    updates, state = tx.update(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
  return {param_groups.path_name(k): np.asarray(u)
          for k, u in jax.tree_util.tree_flatten_with_path(updates)[0]}, state


@pytest.mark.parametrize("convention,wd", [("adamw", 0.5), ("big_vision", 0.05)])
def test_lr_mults_scale_the_step_as_each_convention_reference_does(convention, wd):
  config = _config(weight_decay=wd, decay_convention=convention,
                   lr_mults=(("image/.*", 0.1), ("logit_scale", 3.0)))
  params = _params()
  ours, _ = _optax_updates(config, params, steps=3)
  mults = {"image/kernel": 0.1, "image/bias": 0.1, "logit_scale": 3.0}
  ref = _adam_reference(config, params, 3, lambda k: mults.get(k, 1.0),
                        decays=lambda k: k.endswith("kernel"))
  assert set(ours) == set(ref)
  for k in ref:
    np.testing.assert_allclose(ours[k], ref[k], rtol=2e-5, atol=1e-9, err_msg=k)
  # Under adamw the multiplier shrinks the decay too; under big_vision it does not: with zero
  # gradients only the decay moves a kernel.
  tx, _ = optim.make_optimizer(config, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.update(zeros, tx.init(params), params)[1]
  update = tx.update(zeros, state, params)[0]["image"]["kernel"]
  per_step = 0.1 * wd if convention == "adamw" else wd     # x lr(1) = 0.1 (adamw), lr(t)/lr = 1
  np.testing.assert_allclose(update, -per_step * (0.1 if convention == "adamw" else 1.0)
                             * params["image"]["kernel"], rtol=1e-5)


def test_without_multipliers_the_state_is_plain_adamw():
  """Older checkpoints' optimizer state restores: no multiplier, no new transform in the chain."""
  config = _config(lr_mults=(("image/.*", 1.0),), layer_decay=1.0)
  params = _params()
  tx, _ = optim.make_optimizer(config, params)
  everywhere = lambda tree: jax.tree.map(lambda _: True, tree)
  plain = optax.chain(optax.adamw(optax.constant_schedule(0.1), b1=B1, b2=B2, eps=EPS,
                                  weight_decay=0.1, mask=everywhere))
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))
  assert param_groups.lr_multipliers(config, params) is None


def test_a_zero_multiplier_freezes_exactly_like_a_locked_tower():
  params = _params()
  by_mult, state_mult = _optax_updates(_config(lr_mults=(("text/.*", 0.0),)), params, 3)
  by_lock, state_lock = _optax_updates(_config(locked_tower="text"), params, 3)
  assert np.abs(by_mult["text/kernel"]).max() == 0
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state_mult)[0]]
  assert paths and not [p for p in paths if "'text'" in p]
  assert [p for p in paths if "'image'" in p]
  assert jax.tree.structure(state_mult) == jax.tree.structure(state_lock)
  for k in by_lock:
    np.testing.assert_array_equal(by_mult[k], by_lock[k])


def test_first_matching_pattern_wins_and_useless_patterns_are_errors():
  params = _params()
  config = _config(lr_mults=(("image/kernel", 2.0), ("image/.*", 0.5)))
  mults = param_groups.lr_multipliers(config, params)
  assert mults == {"image/kernel": 2.0, "image/bias": 0.5, "text/kernel": 1.0, "logit_scale": 1.0}
  # Patterns fullmatch the whole path: 'kernel' alone matches nothing.
  with pytest.raises(ValueError, match=r"\['kernel'\] match no parameter"):
    param_groups.lr_multipliers(_config(lr_mults=(("kernel", 2.0),)), params)
  # Two rules in one string: the pattern is 'text/.*=0.1,logit_scale'; the error says what to do.
  with pytest.raises(ValueError, match="one 'pattern=multiplier' per flag"):
    param_groups.lr_multipliers(_config(lr_mults=("text/.*=0.1,logit_scale=0",)), params)
  with pytest.raises(ValueError, match=r"\['image/bias'\] only match parameters that an earlier"):
    param_groups.lr_multipliers(_config(lr_mults=(("image/.*", 2.0), ("image/bias", 0.5))),
                                params)
  with pytest.raises(ValueError, match="locked/frozen"):
    param_groups.lr_multipliers(_config(locked_tower="text", lr_mults=(("text/.*", 2.0),)),
                                params)


def _tiny_model_params(layers=3):
  """The real model's parameter tree (shapes from an abstract model), filled with random values."""
  c = clip_config.get_config("demo")
  c.model.image.update(dict(layers=layers, width=16, heads=2, patch_size=16))
  c.model.text.update(dict(layers=2, width=16, heads=2))
  c.model.embed_dim = 8
  abstract = nnx.eval_shape(lambda: methods.build_model(c, eos_id=2, seed=0))
  shapes = nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])
  rng = np.random.RandomState(0)
  return c, jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), shapes)


def test_layer_decay_scales_each_scanned_block_row_against_a_hand_computed_update():
  c, params = _tiny_model_params(layers=3)
  d, wd, L = 0.5, 0.1, 3
  c.total_steps = 10
  c.optim.update(dict(lr=1.0, warmup_steps=1, schedule="constant", weight_decay=wd, eps=EPS,
                      grad_clip_norm=0.0, layer_decay=d,
                      lr_mults=(("image/transformer/blocks/mlp/.*", 2.0),)))
  config_lib.validate(c)
  tx, _ = optim.make_optimizer(c, params)
  ones = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  state = update(ones, tx.init(params), params)[1]         # step 0: lr 0
  updates = update(ones, state, params)[0]                 # step 1: lr 1; Adam's step 1/(1+eps)
  decays = optim.weight_decay_mask(params, c.optim.no_decay)

  def expected(names, p, decayed):
    top, group = names[0], names[1] if len(names) > 1 else ""
    mult = 1.0
    if top == "image" and group in ("patch_embed", "class_embedding", "pos_embedding", "ln_pre"):
      mult = d ** (L + 1)
    elif top == "image" and group == "transformer":
      mult = (d ** (L - np.arange(L))).reshape((L,) + (1,) * (p.ndim - 1))
      if names[3] == "mlp":
        mult = 2.0 * mult
    return np.broadcast_to(-mult * (1 / (1 + EPS) + (wd * p if decayed else 0.0)), p.shape)

  checked = set()
  for (path, u), p, decayed in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                                   jax.tree.leaves(params), jax.tree.leaves(decays)):
    names = param_groups.path_names(path)
    np.testing.assert_allclose(u, expected(names, np.asarray(p), decayed), rtol=1e-5,
                               err_msg="/".join(names))
    checked.add("/".join(names[:2]))
  assert {"image/transformer", "image/pos_embedding", "image/projection", "text/transformer",
          "logit_scale"} <= checked
  # Undecayed biases: block 0 of 3 moves d^3 = 1/8 as far as the head, block 2 d = 1/2.
  bias = np.asarray(updates["image"]["transformer"]["blocks"]["attn"]["out_bias"])
  np.testing.assert_allclose(bias[:, 0] / np.asarray(updates["image"]["ln_post"]["bias"])[0],
                             [0.125, 0.25, 0.5], rtol=1e-6)


def _layer_mult(name, ndim, d, layers, mlp_mult):
  """BEiT's layer-wise multiplier written out: embeddings d^(L+1), block i d^(L-i), head 1;
  times `mlp_mult` on the image blocks' MLP (an lr_mults rule)."""
  names = name.split("/")
  if names[0] != "image":
    return 1.0
  if names[1] in ("patch_embed", "class_embedding", "pos_embedding", "ln_pre"):
    return d ** (layers + 1)
  if names[1] == "transformer":
    rows = np.array([d ** (layers - i) for i in range(layers)])
    return rows.reshape((layers,) + (1,) * (ndim - 1)) * (mlp_mult if names[3] == "mlp" else 1)
  return 1.0


@pytest.mark.parametrize("convention,wd", [("adamw", 0.3), ("big_vision", 0.05)])
def test_layer_decay_and_lr_mults_match_numpy_adam_on_the_real_tree(convention, wd):
  """Random gradients over three steps of a warmup-cosine schedule: every parameter's update is
  numpy's Adam step x lr(t) x its multiplier, with each convention's decay."""
  c, params = _tiny_model_params(layers=3)
  c.total_steps = 10
  c.optim.update(dict(lr=0.5, min_lr=0.0, warmup_steps=2, schedule="cosine", b1=B1, b2=B2,
                      eps=EPS, weight_decay=wd, decay_convention=convention, grad_clip_norm=0.0,
                      layer_decay=0.6, lr_mults=(("image/transformer/blocks/mlp/.*", 2.0),)))
  config_lib.validate(c)
  ours, _ = _optax_updates(c, params, steps=3)
  shapes = {param_groups.path_name(k): np.ndim(v)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  decays = {param_groups.path_name(k): m for k, m in jax.tree_util.tree_flatten_with_path(
      optim.weight_decay_mask(params, c.optim.no_decay))[0]}
  ref = _adam_reference(c, params, 3, lambda k: _layer_mult(k, shapes[k], 0.6, 3, 2.0),
                        decays=lambda k: decays[k])
  assert set(ours) == set(ref)
  for k in ref:    # float32: where Adam's step and the decay nearly cancel, error ~ eps x scale
    np.testing.assert_allclose(ours[k], ref[k], rtol=2e-5, atol=1e-6 * np.abs(ref[k]).max(),
                               err_msg=k)


def test_layer_decay_refuses_an_image_parameter_in_no_group():
  params = {"image": {"adapter": jnp.ones((2,)), "projection": jnp.ones((2, 2))}}
  config = _config(layer_decay=0.8)
  with pytest.raises(ValueError, match="image/adapter is in no group"):
    param_groups.lr_multipliers(config, params)


@pytest.mark.parametrize("field,value,message", [
    ("locked_tower", "vision", "locked_tower='vision' is not a tower"),
    ("locked_tower", "image,text", "is not a tower"),
    ("lr_mults", (("image/(", 0.1),), "not a regular expression"),
    ("lr_mults", (("image/.*", -1.0),), "number >= 0"),
    ("lr_mults", (("image/.*", "fast"),), "number >= 0"),
    ("lr_mults", ("image/.*",), "pairs"),
    ("lr_mults", ("image/.*", 0.1), "pairs"),        # a flat tuple, not ((pattern, mult),)
    ("layer_decay", 0.0, r"must be in \(0, 1\]"),
    ("layer_decay", 1.5, r"must be in \(0, 1\]"),
])
def test_validate_rejects_bad_fine_tuning_controls(field, value, message):
  c = clip_config.get_config("demo")
  c.optim[field] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_layer_decay_with_a_locked_image_tower_is_refused():
  c = clip_config.get_config("demo")
  c.optim.locked_tower, c.optim.layer_decay = "image", 0.75
  with pytest.raises(ValueError, match="locks: drop one"):
    config_lib.validate(c)
  c.optim.locked_tower = "text"              # the image tower still trains: fine
  config_lib.validate(c)


def _parse_command_line(*args):
  """The config xclip_jax.main would get from these arguments (ml_collections' config_flags)."""
  argv = ["prog", "--config=configs/clip.py:demo", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_command_line_flags_reach_the_optimizer():
  c = _parse_command_line("--config.optim.locked_tower=text",
                          "--config.optim.lr_mults=image/transformer/.*=0.5",
                          "--config.optim.lr_mults=logit_scale=0",
                          "--config.optim.layer_decay=0.75")
  assert c.optim.locked_tower == "text"
  assert param_groups.lr_mult_rules(c.optim) == (("image/transformer/.*", 0.5),
                                                 ("logit_scale", 0.0))
  assert c.optim.layer_decay == 0.75
  config_lib.validate(c)
  image = _parse_command_line("--config.optim.locked_tower=image")
  assert image.optim.locked_tower == "image" and param_groups.frozen_paths(image) == ("image",)
  # The whole tuple as a Python literal works too.
  literal = _parse_command_line("--config.optim.lr_mults=(('image/.*', 0.1), ('text/.*', 0.2))")
  assert param_groups.lr_mult_rules(literal.optim) == (("image/.*", 0.1), ("text/.*", 0.2))


def test_a_saved_config_with_the_new_fields_resumes_unchanged():
  c = clip_config.get_config("demo")
  c.optim.update(dict(locked_tower="text", lr_mults=(("image/.*", 0.1),), layer_decay=0.8))
  saved = json.loads(json.dumps(c.to_dict()))          # what a checkpoint stores
  reloaded = clip_config.get_config("demo")
  config_lib.merge_saved(reloaded, saved)               # configs/finetune.py's path
  assert param_groups.lr_mult_rules(reloaded.optim) == (("image/.*", 0.1),)
  assert resume.differences(saved, c) == {} and resume.differences(saved, reloaded) == {}
  changed = ml_collections.ConfigDict(c.to_dict())
  changed.optim.lr_mults = (("image/.*", 0.2),)
  assert set(resume.differences(saved, changed)) == {"optim.lr_mults"}
