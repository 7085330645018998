"""Optimiser: schedule shape, weight-decay mask by name, clipping, the weight-decay conventions
against their formulas, and frozen parameters (no update, no optimizer state)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import clip as clip_config
from xclip_jax import optim, param_groups


def _params():
  return {
      "image": {"blocks": {"ln_1": {"scale": jnp.ones((2, 4)), "bias": jnp.zeros((2, 4))},
                           "mlp": {"kernel": jnp.ones((2, 4, 8)), "bias": jnp.zeros((2, 8))},
                           "attn": {"qkv_kernel": jnp.ones((2, 4, 3)), "qkv_bias": jnp.ones((2, 3))}},
                "class_embedding": jnp.ones((4,)), "pos_embedding": jnp.ones((5, 4))},
      "text": {"token_embedding": {"embedding": jnp.ones((10, 4))}},
      "logit_scale": jnp.float32(2.6),
  }


def test_decay_mask_excludes_biases_norms_and_scalars_by_name():
  mask = optim.weight_decay_mask(_params(), clip_config.get_config("demo").optim.no_decay)
  assert mask["image"]["blocks"]["mlp"]["kernel"] is True
  assert mask["image"]["pos_embedding"] is True
  assert mask["text"]["token_embedding"]["embedding"] is True
  # A scanned LayerNorm scale is 2-D: an ndim rule would decay it; the name rule must not.
  assert mask["image"]["blocks"]["ln_1"]["scale"] is False
  assert mask["image"]["blocks"]["ln_1"]["bias"] is False
  assert mask["image"]["blocks"]["mlp"]["bias"] is False
  assert mask["image"]["blocks"]["attn"]["qkv_bias"] is False
  assert mask["image"]["blocks"]["attn"]["qkv_kernel"] is True
  assert mask["image"]["class_embedding"] is False
  assert mask["logit_scale"] is False


def test_schedule_warmup_then_cosine_to_min():
  config = clip_config.get_config("demo")
  config.optim.lr, config.optim.min_lr, config.optim.warmup_steps = 1e-3, 1e-5, 10
  sched = optim.learning_rate_schedule(config.optim, total_steps=110)
  np.testing.assert_allclose(float(sched(0)), 0.0)
  np.testing.assert_allclose(float(sched(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), 1e-5 + 0.5 * (1e-3 - 1e-5), rtol=1e-5)
  np.testing.assert_allclose(float(sched(110)), 1e-5, rtol=1e-5)


def test_no_decay_params_only_move_by_adam_and_clip_applies():
  config = clip_config.get_config("demo")
  config.optim.lr, config.optim.warmup_steps, config.optim.weight_decay = 1.0, 1, 0.5
  config.optim.grad_clip_norm = 1.0
  config.total_steps = 100
  params = _params()
  tx, _ = optim.make_optimizer(config, params)
  state = tx.init(params)
  zero_grads = jax_tree_zeros(params)
  updates, _ = tx.update(zero_grads, state, params)
  # With zero gradients only decoupled weight decay moves parameters, and only decayed ones.
  # Step 0 has lr 0, so take step 1's update.
  updates, _ = tx.update(zero_grads, tx.update(zero_grads, state, params)[1], params)
  # AdamW: the update is -lr(1) * weight_decay * p (lr(1) = 1 after one warmup step).
  np.testing.assert_allclose(updates["image"]["blocks"]["mlp"]["kernel"], -0.5, rtol=1e-6)
  assert float(jnp.abs(updates["image"]["blocks"]["ln_1"]["scale"]).max()) == 0
  assert float(jnp.abs(updates["logit_scale"])) == 0
  # Global-norm clipping: a huge gradient is rescaled to norm 1 before Adam sees it.
  clip = optax.clip_by_global_norm(1.0)
  big = jax_tree_full(params, 100.0)
  clipped, _ = clip.update(big, clip.init(params))
  np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1.0, rtol=1e-5)


def jax_tree_zeros(tree):
  import jax
  return jax.tree.map(jnp.zeros_like, tree)


def jax_tree_full(tree, value):
  import jax
  return jax.tree.map(lambda x: jnp.full_like(x, value), tree)


def _decay_per_step(convention, lr, weight_decay, steps):
  """The update of a parameter of ones under zero gradients at each of `steps`."""
  config = clip_config.get_config("demo")
  config.optim.update(dict(lr=lr, min_lr=0.0, warmup_steps=4, weight_decay=weight_decay,
                           decay_convention=convention, grad_clip_norm=0.0))
  config.total_steps = 20
  params = {"kernel": jnp.ones((3,)), "bias": jnp.ones((3,))}
  tx, schedule = optim.make_optimizer(config, params)
  state = tx.init(params)
  zeros = jax_tree_zeros(params)
  out = []
  for step in range(max(steps) + 1):
    updates, state = tx.update(zeros, state, params)
    if step in steps:
      assert float(jnp.abs(updates["bias"]).max()) == 0          # biases are never decayed
      out.append((float(schedule(step)), float(updates["kernel"][0])))
  return out


def test_weight_decay_per_step_follows_each_convention():
  """With zero gradients Adam's step is 0, so an update is the decay alone, at p = 1."""
  steps = (1, 2, 4, 10, 19)
  for lr_t, update in _decay_per_step("adamw", 1e-3, 0.1, steps):
    np.testing.assert_allclose(update, -lr_t * 0.1, rtol=1e-5)        # lr(t) x wd
  for lr_t, update in _decay_per_step("big_vision", 1e-3, 1e-4, steps):
    np.testing.assert_allclose(update, -1e-4 * lr_t / 1e-3, rtol=1e-5)  # wd x lr(t) / lr
  # At the peak big_vision's wd 1e-4 decays 1e-4 per step; AdamW's would decay lr x 1e-4 = 1e-7.
  (_, peak_bv), = _decay_per_step("big_vision", 1e-3, 1e-4, (4,))
  (_, peak_adamw), = _decay_per_step("adamw", 1e-3, 1e-4, (4,))
  np.testing.assert_allclose([peak_bv, peak_adamw], [-1e-4, -1e-7], rtol=1e-5)


def test_siglip_recipe_uses_big_vision_decay_on_kernels():
  from configs import siglip as siglip_config
  for variant in ("demo", "vit_b16"):
    c = siglip_config.get_config(variant)
    assert c.optim.decay_convention == "big_vision"
  c = siglip_config.get_config("vit_b16")
  assert c.optim.weight_decay == 1e-4
  mask = optim.weight_decay_mask(_params(), c.optim.no_decay)
  # big_vision decays '.*/kernel$' only: no embedding tables, no position embeddings.
  assert mask["image"]["blocks"]["mlp"]["kernel"] is True
  assert mask["image"]["pos_embedding"] is False
  assert mask["text"]["token_embedding"]["embedding"] is False
  # The demo's decay per step is the old AdamW one (lr 1e-3 x 0.1 = 1e-4 x lr(t) / lr).
  assert siglip_config.get_config("demo").optim.weight_decay == pytest.approx(1e-4)


def test_decay_convention_is_checked():
  c = clip_config.get_config("demo")
  c.optim.decay_convention = "torch"
  with pytest.raises(ValueError, match="decay_convention='torch'"):
    optim.make_optimizer(c, _params())


def test_frozen_parameters_get_zero_updates_and_no_optimizer_state():
  config = clip_config.get_config("demo")
  config.model.image.freeze_patch_embed = True
  config.optim.update(dict(lr=1.0, warmup_steps=1, weight_decay=0.5, grad_clip_norm=1.0))
  config.total_steps = 10
  params = dict(_params())
  params["image"] = dict(params["image"], patch_embed={"kernel": jnp.ones((2, 2, 3, 4))})
  tx, _ = optim.make_optimizer(config, params)
  state = tx.init(params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert not [p for p in paths if "patch_embed" in p]
  assert [p for p in paths if "qkv_kernel" in p]                 # the others keep Adam's moments
  grads = jax_tree_full(params, 1e3)
  state = tx.update(grads, state, params)[1]
  updates, _ = tx.update(grads, state, params)
  assert float(jnp.abs(updates["image"]["patch_embed"]["kernel"]).max()) == 0
  assert float(jnp.abs(updates["image"]["pos_embedding"]).min()) > 0.4
  # Clipping sees the trainable gradients only: the frozen kernel's 48 entries of 1e3 would
  # otherwise dominate the global norm and shrink every other update. Reference: the same
  # optimiser on the parameters without the frozen kernel.
  trainable = lambda tree: dict(tree, image={k: v for k, v in tree["image"].items()
                                             if k != "patch_embed"})
  config.model.image.freeze_patch_embed = False
  ref_tx, _ = optim.make_optimizer(config, trainable(params))
  ref_state = ref_tx.update(trainable(grads), ref_tx.init(trainable(params)),
                            trainable(params))[1]
  ref_updates, _ = ref_tx.update(trainable(grads), ref_state, trainable(params))
  for a, b in zip(jax.tree.leaves(trainable(updates)), jax.tree.leaves(ref_updates)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_frozen_path_that_matches_nothing_is_an_error():
  with pytest.raises(ValueError, match="image/patch_embedding"):
    param_groups.parameter_labels(_params(), ("image/patch_embedding",))
  labels = param_groups.parameter_labels(_params(), ("image/blocks",))
  assert labels["image"]["blocks"]["mlp"]["kernel"] == param_groups.FROZEN
  assert labels["image"]["pos_embedding"] == param_groups.TRAINABLE


def test_paper_recipes_clip_gradients_only_where_their_references_do_and_two_demos_clip():
  from configs import declip, nclip, siglip, slip, xclip
  for module, variants in ((clip_config, ("vit_b32", "vit_b16", "vit_l14")),
                           (declip, ("vit_b32",)), (slip, ("demo", "vit_b16")),
                           (nclip, ("demo", "vit_b16")), (xclip, ("demo", "vit_b16"))):
    for variant in variants:
      assert module.get_config(variant).optim.grad_clip_norm == 0.0, (module.__name__, variant)
  for variant in ("demo", "vit_b16"):
    assert siglip.get_config(variant).optim.grad_clip_norm == 1.0
  # The CLIP demo is a recipe of its own; it clips at 1 (measured: configs/clip.py, README),
  # and the DeCLIP demo keeps its optimiser.
  assert clip_config.get_config("demo").optim.grad_clip_norm == 1.0
  assert declip.get_config("demo").optim.grad_clip_norm == 1.0
