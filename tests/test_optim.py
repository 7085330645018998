"""Optimiser: schedule shape, weight-decay mask by name, clipping."""

import jax.numpy as jnp
import numpy as np
import optax

from configs import clip as clip_config
from xclip_jax import optim


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
  assert float(jnp.abs(updates["image"]["blocks"]["mlp"]["kernel"]).max()) > 0
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
