"""Model behaviour: shapes, pooling, causality, scan/loop parity, remat, dtype, init scales."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xclip_jax import config as cfglib
from xclip_jax import methods
from xclip_jax.models import text as text_lib
from xclip_jax.models import transformer

EOS = 2
WIDTH, HEADS, LAYERS = 32, 2, 2
BLOCK_KW = dict(width=WIDTH, heads=HEADS, mlp_ratio=2.0, causal=True, activation="quick_gelu")


def tiny_config(**model_overrides):
  c = cfglib.base_config()
  c.model.embed_dim = 16
  c.model.image.update(dict(image_size=16, patch_size=8, width=WIDTH, layers=LAYERS, heads=HEADS,
                            mlp_ratio=2.0))
  c.model.text.update(dict(context_length=8, width=WIDTH, layers=LAYERS, heads=HEADS,
                           mlp_ratio=2.0, vocab_size=64))
  c.model.update(model_overrides)
  return c


def text_ids(rows=2, length=8, eos_at=5, seed=0):
  """Random tokens in [3, 64) with EOS at `eos_at` and padding after it."""
  ids = np.random.RandomState(seed).randint(3, 64, size=(rows, length)).astype(np.int32)
  ids[:, eos_at] = EOS
  ids[:, eos_at + 1:] = 0
  return jnp.asarray(ids)


def images(batch=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, 16, 16, 3))


@nnx.jit(static_argnames="method")
def run(module, *args, method="__call__"):
  """module.method(*args), jitted: one compile per (module structure, shapes) instead of
  compiling each op eagerly."""
  return getattr(module, method)(*args)


@pytest.fixture(scope="module")
def model():
  return methods.build_model(tiny_config(), eos_id=EOS, seed=0)


# ---- outputs -------------------------------------------------------------------------------------


def test_two_tower_outputs(model):
  out = run(model, {"image": images(2), "text": text_ids(2)})
  assert out["image_emb"].shape == (2, 16) and out["text_emb"].shape == (2, 16)
  assert out["image_pooled"].shape == (2, WIDTH)
  assert out["text_tokens"].shape == (2, 8, WIDTH)
  for key in ("image_emb", "text_emb", "logit_scale"):
    assert out[key].dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(out["image_emb"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(out["text_emb"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(run(model, images(2), method="encode_image"), out["image_emb"],
                             atol=1e-6)
  np.testing.assert_allclose(run(model, text_ids(2), method="encode_text"), out["text_emb"],
                             atol=1e-6)
  # Different rows really get different embeddings.
  assert float(jnp.abs(out["image_emb"][0] - out["image_emb"][1]).max()) > 1e-3


def test_image_tower_pools_class_token_and_projects(model):
  out = run(model.image, images(2))
  assert out["tokens"].shape == (2, 1 + (16 // 8)**2, WIDTH)
  np.testing.assert_array_equal(out["pooled"], out["tokens"][:, 0])
  np.testing.assert_allclose(out["embed"], out["pooled"] @ model.image.projection[...], atol=1e-5)
  with pytest.raises(ValueError, match="images must be"):
    model.image(jnp.zeros((2, 32, 32, 3)))


# ---- text pooling and causality ------------------------------------------------------------------


def test_pool_positions():
  ids = jnp.array([[5, 6, EOS, 0, 0],       # first EOS
                   [5, EOS, 7, EOS, 0],     # two EOS: the first wins
                   [5, 6, 7, 0, 0],         # truncated (no EOS): last non-pad token
                   [5, 6, 7, 8, 9],         # no EOS, no pad: last position
                   [0, 0, 0, 0, 0]])        # all padding: position 0
  np.testing.assert_array_equal(text_lib.pool_positions(ids, EOS), [2, 1, 2, 4, 0])


def test_text_embedding_reads_the_eos_position(model):
  ids = text_ids(2, eos_at=4)
  base = run(model.text, ids)
  np.testing.assert_array_equal(base["pooled"], base["tokens"][:, 4])

  after = ids.at[:, 6].set(17)            # a token after EOS: invisible under the causal mask
  np.testing.assert_allclose(run(model.text, after)["embed"], base["embed"], atol=1e-6)
  before = ids.at[:, 1].set(17 if int(ids[0, 1]) != 17 else 18)   # a token before EOS
  assert float(jnp.abs(run(model.text, before)["embed"] - base["embed"]).max()) > 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask(causal):
  c = tiny_config()
  c.model.text.causal = causal
  text = methods.build_model(c, eos_id=EOS, seed=1).text
  ids = text_ids(2, eos_at=6)
  changed = ids.at[:, 5].set(40)
  prefix_diff = jnp.abs(run(text, ids)["tokens"][:, :5] - run(text, changed)["tokens"][:, :5]).max()
  if causal:
    assert float(prefix_diff) < 1e-6          # positions < 5 never see position 5
  else:
    assert float(prefix_diff) > 1e-4          # bidirectional: they do


# ---- scanned blocks ------------------------------------------------------------------------------


def make_blocks(remat="none", dtype="float32", seed=0):
  return transformer.ScannedBlocks(layers=LAYERS, dtype=dtype, remat=remat, **BLOCK_KW,
                                   rngs=nnx.Rngs(seed))


def test_scan_matches_python_loop_over_blocks():
  blocks = make_blocks()
  stacked = nnx.to_pure_dict(nnx.state(blocks.blocks))
  x = jax.random.normal(jax.random.key(1), (2, 6, WIDTH))

  reference = x
  for i in range(LAYERS):   # independent unscanned modules holding layer i's parameters
    block = nnx.eval_shape(lambda: transformer.ResidualBlock(
        depth=LAYERS, dtype="float32", rngs=nnx.Rngs(99), **BLOCK_KW))
    state = nnx.state(block)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: a[i], stacked))
    nnx.update(block, state)
    reference = block(reference)

  out = run(blocks, x)
  np.testing.assert_allclose(out, reference, atol=1e-5)
  # The layers were initialised differently (split rngs), so the parity above is not trivial.
  kernel = stacked["attn"]["qkv_kernel"]
  assert float(jnp.abs(kernel[0] - kernel[1]).max()) > 1e-3
  assert not np.allclose(out, x, atol=1e-3)


def _loss_and_grads(blocks, x):
  graphdef, params = nnx.split(blocks, nnx.Param)

  def loss_fn(params):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.fixture(scope="module")
def no_remat_loss_and_grads():
  x = jax.random.normal(jax.random.key(2), (2, 6, WIDTH))
  return x, _loss_and_grads(make_blocks("none"), x)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_matches_no_remat(policy, no_remat_loss_and_grads):
  x, (loss, grads) = no_remat_loss_and_grads
  remat_loss, remat_grads = _loss_and_grads(make_blocks(policy), x)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               remat_grads, grads)
  assert float(jnp.abs(grads["blocks"]["mlp"]["fc"]["kernel"][...]).max()) > 0


def test_bad_remat_and_activation_are_rejected():
  with pytest.raises(ValueError, match="remat"):
    make_blocks("sometimes")
  with pytest.raises(ValueError, match="activation"):
    transformer.MLP(8, 16, out_std=1.0, activation="relu6", dtype=jnp.float32, rngs=nnx.Rngs(0))


# ---- dtypes --------------------------------------------------------------------------------------


def test_bfloat16_compute_keeps_float32_params(model):
  bf16 = methods.build_model(tiny_config(dtype="bfloat16"), eos_id=EOS, seed=0)
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  batch = {"image": images(2), "text": text_ids(2)}
  out16, out32 = run(bf16, batch), run(model, batch)     # same seed: same float32 params
  assert out16["image_pooled"].dtype == jnp.bfloat16
  assert out16["text_tokens"].dtype == jnp.bfloat16
  for key in ("image_emb", "text_emb"):
    assert out16[key].dtype == jnp.float32      # normalised in float32
    np.testing.assert_allclose(out16[key], out32[key], atol=0.05)
    cosine = jnp.sum(out16[key] * out32[key], axis=-1)
    assert float(cosine.min()) > 0.99


# ---- logit scale ---------------------------------------------------------------------------------


def test_logit_scale_init_and_clamp():
  m = methods.build_model(tiny_config(), eos_id=EOS, seed=0)
  assert m.logit_scale[...].dtype == jnp.float32
  np.testing.assert_allclose(m.logit_scale[...], math.log(1 / 0.07), rtol=1e-6)
  np.testing.assert_allclose(m.scale(), 1 / 0.07, rtol=1e-5)

  m.logit_scale[...] = jnp.float32(math.log(1000.0))
  np.testing.assert_allclose(m.scale(), 100.0)
  m.logit_scale[...] = jnp.float32(math.log(50.0))
  np.testing.assert_allclose(m.scale(), 50.0, rtol=1e-5)


# ---- init ----------------------------------------------------------------------------------------


def test_init_follows_clip_stds(model):
  width = WIDTH
  p = nnx.to_pure_dict(nnx.state(model.text.transformer, nnx.Param))["blocks"]
  proj_std = width**-0.5 * (2 * LAYERS)**-0.5
  expected = {("attn", "qkv_kernel"): width**-0.5, ("attn", "out_kernel"): proj_std,
              ("mlp", "fc", "kernel"): (2 * width)**-0.5, ("mlp", "proj", "kernel"): proj_std}
  for path, std in expected.items():
    value = p
    for key in path:
      value = value[key]
    np.testing.assert_allclose(float(jnp.std(value)), std, rtol=0.06, err_msg=str(path))
  assert float(jnp.abs(p["attn"]["qkv_bias"]).max()) == 0.0
  np.testing.assert_array_equal(p["ln_1"]["scale"], 1.0)
  image = nnx.to_pure_dict(nnx.state(model.image, nnx.Param))
  np.testing.assert_allclose(float(jnp.std(image["pos_embedding"])), width**-0.5, rtol=0.15)
  text = nnx.to_pure_dict(nnx.state(model.text, nnx.Param))
  np.testing.assert_allclose(float(jnp.std(text["token_embedding"])), 0.02, rtol=0.06)


def test_logical_names_on_params():
  blocks = make_blocks()
  kernel = blocks.blocks.attn.qkv_kernel
  assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "qkv", "heads", "kv")
  assert blocks.blocks.mlp.fc.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  assert blocks.blocks.ln_1.scale.get_metadata()["out_sharding"] == ("layers", "norm")
  assert kernel[...].shape == (LAYERS, WIDTH, 3, HEADS, WIDTH // HEADS)


def test_vit_and_text_param_names(model):
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert {"class_embedding", "pos_embedding", "patch_embed", "ln_pre", "ln_post", "projection",
          "transformer"} == set(params["image"])
  assert {"token_embedding", "pos_embedding", "ln_final", "projection",
          "transformer"} == set(params["text"])
  assert params["image"]["pos_embedding"].shape == (5, WIDTH)
  assert params["text"]["token_embedding"].shape == (64, WIDTH)
  # Both towers draw from one Rngs: their (same-shaped) block parameters must still differ.
  image_qkv = params["image"]["transformer"]["blocks"]["attn"]["qkv_kernel"]
  text_qkv = params["text"]["transformer"]["blocks"]["attn"]["qkv_kernel"]
  assert float(jnp.abs(image_qkv - text_qkv).max()) > 1e-3
