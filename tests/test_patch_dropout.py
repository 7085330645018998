"""FLIP patch dropout (config.model.image.patch_dropout): evaluation untouched, kept tokens a
uniformly random subset per example, the tower on them equals a hand-gathered run, no data moved
between devices, and train steps equal on 1 and 8 devices and with gradient accumulation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xclip_jax import bench
from xclip_jax import config as config_lib
from xclip_jax import methods
from xclip_jax.models import vit
from xclip_jax.parallel import mesh as mesh_lib

from tests.test_models import EOS, images, run, text_ids, tiny_config
from tests.tiny import tiny_state
from tests.tiny import tiny_config as train_config

N_PATCHES = (16 // 8)**2            # test_models' tiny image tower: 16px images, 8px patches


def _config(p, **overrides):
  c = tiny_config(**overrides)
  c.model.image.patch_dropout = p
  return c


def _built(config, mesh=None):
  """The model of `config`, initialised under jit (one compile instead of one per eager op)."""
  if mesh is None:
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  graphdef, params, rest = mesh_lib.create_sharded(
      lambda: methods.build_model(config, eos_id=EOS, seed=0), mesh)
  return nnx.merge(graphdef, params, rest)


def _model(p, **overrides):
  c = _config(p, **overrides)
  return _built(c), c


@nnx.jit
def _tower(tower, images_, keys):
  return tower(images_, patch_keys=keys)


@pytest.fixture(scope="module")
def models():
  """The same parameters (same seed) without and with patch dropout 0.5."""
  return _model(0.0)[0], _model(0.5)[0]


def _batch(config, rows=4, step=3):
  batch = {"image": images(rows), "text": text_ids(rows)}
  return vit.add_patch_keys(batch, config, jnp.int32(step))


# ---- evaluation is unchanged ---------------------------------------------------------------------


def test_evaluation_and_encode_image_are_bitwise_unchanged(models):
  plain, dropping = models
  for a, b in zip(jax.tree.leaves(nnx.state(plain, nnx.Param)),
                  jax.tree.leaves(nnx.state(dropping, nnx.Param))):
    np.testing.assert_array_equal(a, b)           # patch_dropout changes no parameter
  batch = _batch(_config(0.5))
  assert vit.PATCH_KEYS in batch
  reference = run(plain, images(4), method="encode_image")
  np.testing.assert_array_equal(run(dropping, images(4), method="encode_image"), reference)
  # train=False ignores the keys even when the batch carries them.
  evaluated = nnx.jit(lambda m, b: m(b, train=False))(dropping, batch)
  for key, value in nnx.jit(lambda m, b: m(b, train=False))(plain, batch).items():
    np.testing.assert_array_equal(evaluated[key], value, err_msg=key)
  np.testing.assert_array_equal(evaluated["image_emb"], reference)
  # ...while training with them does drop tokens (the comparison above can fail).
  trained = nnx.jit(lambda m, b: m(b, train=True))(dropping, batch)
  assert float(jnp.abs(trained["image_emb"] - reference).max()) > 1e-3
  np.testing.assert_array_equal(trained["text_emb"], evaluated["text_emb"])


def test_training_without_keys_is_an_error_and_a_zero_rate_adds_none(models):
  _, dropping = models
  with pytest.raises(ValueError, match="patch_dropout_keys"):
    dropping({"image": images(2), "text": text_ids(2)}, train=True)
  c = tiny_config()
  assert vit.PATCH_KEYS not in vit.add_patch_keys({"image": images(2)}, c, jnp.int32(0))


@pytest.mark.parametrize("p", [1.0, -0.1, 0.9])
def test_invalid_rates_are_config_errors(p):
  c = tiny_config()                     # 4 patches: 0.9 would keep round(0.4) = 0 of them
  c.model.image.patch_dropout = p
  with pytest.raises(ValueError, match=f"patch_dropout={p}"):
    config_lib.validate(c)


# ---- which tokens are kept -----------------------------------------------------------------------


def test_kept_count_is_static_and_rounded():
  assert [vit.num_kept_patches(196, p) for p in (0.0, 0.5, 0.75)] == [196, 98, 49]
  assert vit.num_kept_patches(49, 0.5) == 24              # round(24.5): Python's round, to even
  assert vit.num_kept_patches(16, 0.7) == 5               # round(4.8)


def test_kept_indices_are_distinct_patches_different_per_row_and_reproducible():
  keys = vit.example_patch_keys(seed=0, step=jnp.int32(7), batch_size=64)
  index = np.asarray(vit.kept_patch_indices(keys, 196, 49))
  assert index.shape == (64, 49) and index.dtype == np.int32
  assert index.min() >= 0 and index.max() < 196
  assert (np.diff(index, axis=1) > 0).all()               # increasing: distinct within a row
  assert len({tuple(row) for row in index}) == 64         # every row its own subset
  again = vit.kept_patch_indices(vit.example_patch_keys(0, jnp.int32(7), 64), 196, 49)
  np.testing.assert_array_equal(again, index)             # a function of (seed, step, row)
  for other in (vit.example_patch_keys(0, jnp.int32(8), 64),
                vit.example_patch_keys(1, jnp.int32(7), 64)):
    other_index = np.asarray(vit.kept_patch_indices(other, 196, 49))
    assert (other_index != index).any(axis=1).all()       # next step / other seed: new subsets
  # Row r's key does not depend on the batch size (nor, so, on how rows are split).
  np.testing.assert_array_equal(vit.example_patch_keys(0, jnp.int32(7), 16), keys[:16])


def test_kept_subsets_are_uniformly_distributed():
  # Every 2-subset of 5 patches equally likely: 10 subsets, 20,000 rows (2 steps x 10,000).
  keys = jnp.concatenate([vit.example_patch_keys(5, jnp.int32(s), 10_000) for s in (0, 1)])
  index = np.asarray(vit.kept_patch_indices(keys, 5, 2))
  subsets = list(itertools.combinations(range(5), 2))
  counts = np.array([np.sum((index[:, 0] == a) & (index[:, 1] == b)) for a, b in subsets])
  assert counts.sum() == 20_000
  expected = 20_000 / len(subsets)
  chi2 = np.sum((counts - expected)**2 / expected)
  assert chi2 < 27.88, (counts, chi2)                     # chi-square(9) 99.9% quantile
  # ViT-B/16's grid at 0.75: each of the 196 patches kept with probability 1/4.
  keys = vit.example_patch_keys(6, jnp.int32(0), 4000)
  kept = np.bincount(np.asarray(vit.kept_patch_indices(keys, 196, 49)).ravel(), minlength=196)
  expected = 4000 * 49 / 196
  chi2 = np.sum((kept - expected)**2 / expected)
  assert chi2 < 259.0, chi2                               # chi-square(195) 99.9% quantile
  assert abs(kept[:98].sum() - kept[98:].sum()) < 4 * np.sqrt(kept.sum())   # no half favoured


def test_views_of_one_example_drop_different_patches(models):
  _, dropping = models
  batch = _batch(_config(0.5), rows=32)
  two = dropping.image.patch_keys(batch, train=True, views=(0, 1))
  assert two.shape == (64,) + batch[vit.PATCH_KEYS].shape[1:]
  index = np.asarray(vit.kept_patch_indices(two, 196, 98))
  assert (index[0::2] != index[1::2]).any(axis=1).all()
  # View 0 of the interleaved pair is the single-view key (the CLIP view).
  np.testing.assert_array_equal(two[0::2], dropping.image.patch_keys(batch, train=True))
  assert dropping.image.patch_keys(batch, train=False) is None


@nnx.jit
def _train_forward(model, batch):
  return model(batch, train=True)


def test_multi_view_methods_drop_patches_in_every_view_with_its_own_key():
  """DeCLIP's and SLIP's interleaved forwards: view i of row r is the tower on that image with
  view i's key, the same as one image at a time."""
  import configs.slip as slip_config
  from tests.test_declip_model import make_batch
  from tests.test_declip_model import tiny_config as declip_tiny
  from xclip_jax.models.two_tower import l2_normalize

  c = declip_tiny()
  c.model.image.patch_dropout = 0.5
  model = _built(c)
  batch = vit.add_patch_keys(make_batch(b=4), c, jnp.int32(2))
  out = _train_forward(model, batch)
  for view, (image_key, emb_key) in enumerate((("image", "image_emb"), ("image2", "image_emb2"))):
    keys = model.image.patch_keys(batch, train=True, views=(view,))
    alone = _tower(model.image, batch[image_key], keys)["embed"]
    np.testing.assert_allclose(out[emb_key], l2_normalize(alone), atol=1e-5, err_msg=emb_key)
    full = l2_normalize(_tower(model.image, batch[image_key], None)["embed"])
    assert float(jnp.abs(out[emb_key] - full).max()) > 1e-3        # tokens were dropped

  c = slip_config.get_config("demo")
  c.model.embed_dim = 16
  c.model.image.update(dict(width=32, layers=1, heads=2, patch_size=8, patch_dropout=0.5))
  c.model.text.update(dict(width=32, layers=1, heads=2))
  c.slip.update(dict(mlp_dim=32, embed_dim=16))
  model = _built(c)
  b = make_batch(b=4)
  batch = vit.add_patch_keys(dict(image=b["image"], image2=b["image2"], image3=b["image"][::-1],
                                  text=b["text"]), c, jnp.int32(2))
  out = _train_forward(model, batch)
  keys = [model.image.patch_keys(batch, train=True, views=(v,)) for v in range(3)]
  np.testing.assert_allclose(out["image_emb"], l2_normalize(
      _tower(model.image, batch["image"], keys[0])["embed"]), atol=1e-5)
  for view, (image_key, z_key) in enumerate((("image2", "ssl_z1"), ("image3", "ssl_z2")), 1):
    pooled = _tower(model.image, batch[image_key], keys[view])["pooled"]
    # BatchNorm over 4 rows amplifies the rounding of the 8-row forward: atol 1e-4.
    np.testing.assert_allclose(out[z_key], model.ssl_head(pooled, train=True), atol=1e-4)


# ---- the tower on the kept tokens ----------------------------------------------------------------


def _tower_by_hand(tower, images_, index):
  """The ViT written out step by step, keeping tokens [class] + patches `index` with numpy."""
  x = tower.patch_embed(images_)
  x = x.reshape(x.shape[0], -1, x.shape[-1])
  cls = jnp.broadcast_to(tower.class_embedding[...], (x.shape[0], 1, x.shape[-1]))
  x = np.asarray(jnp.concatenate([cls, x], axis=1) + tower.pos_embedding[...])
  rows = np.arange(x.shape[0])[:, None]
  x = np.concatenate([x[:, :1], x[rows, 1 + np.asarray(index)]], axis=1)
  tokens = tower.ln_post(tower.transformer(tower.ln_pre(jnp.asarray(x))))
  return tokens, tokens[:, 0] @ tower.projection[...]


def test_tower_output_equals_the_tower_on_hand_gathered_tokens(models):
  _, dropping = models
  batch = _batch(_config(0.5))
  keys = dropping.image.patch_keys(batch, train=True)
  out = _tower(dropping.image, batch["image"], keys)
  index = vit.kept_patch_indices(keys, N_PATCHES, 2)
  assert out["tokens"].shape == (4, 1 + 2, 32)
  tokens, embed = _tower_by_hand(dropping.image, batch["image"], index)
  np.testing.assert_allclose(out["tokens"], tokens, atol=1e-5)
  np.testing.assert_allclose(out["embed"], embed, atol=1e-5)


def test_remat_gives_the_same_gradients_with_patch_dropout():
  grads = {}
  for remat in ("none", "full"):
    model, c = _model(0.5, remat=remat)
    keys = model.image.patch_keys(_batch(c), train=True)
    graphdef, params = nnx.split(model.image, nnx.Param)

    def loss(params):
      out = nnx.merge(graphdef, params)(images(4), patch_keys=keys)
      return jnp.sum(jnp.sin(out["embed"] * 3.0))
    grads[remat] = jax.jit(jax.grad(loss))(params)
  for a, b in zip(jax.tree.leaves(grads["full"]), jax.tree.leaves(grads["none"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(grads["none"]["pos_embedding"]).max()) > 0


# ---- sharding ------------------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")


def test_dropping_moves_no_data_between_devices():
  """The image tower's forward on a batch split over 8 devices, keys made inside the program:
  no collective at all, as without dropout."""
  mesh = mesh_lib.make_mesh(dict(data=8))
  hlo = {}
  for p in (0.0, 0.5):
    graphdef, params = nnx.split(_built(_config(p), mesh).image, nnx.Param)

    def forward(params, images_, step):
      keys = vit.example_patch_keys(0, step, images_.shape[0])
      return nnx.merge(graphdef, params)(images_, patch_keys=keys if p else None)["embed"]

    sharded = jax.device_put(images(16), mesh_lib.batch_sharding(mesh))
    with jax.set_mesh(mesh):
      compiled = jax.jit(forward, in_shardings=(mesh_lib.replicated(mesh),
                                                mesh_lib.batch_sharding(mesh), None),
                         out_shardings=mesh_lib.batch_sharding(mesh)).lower(
                             params, sharded, jnp.int32(0)).compile()
    hlo[p] = compiled.as_text()
  assert "gather" in hlo[0.5] and "sort" in hlo[0.5]       # the dropout is in the program
  for p, text in hlo.items():
    assert not [op for op in COLLECTIVES if op in text], p


def _clip_batches(rows=16, count=3):
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(count):
    text = rng.randint(4, 200, size=(rows, 32)).astype(np.int32)
    text[:, 9], text[:, 10:] = 2, 0
    batches.append({"image": rng.normal(size=(rows, 32, 32, 3)).astype(np.float32), "text": text})
  return batches


def _trajectory(mesh, config, batches):
  state, step = tiny_state(mesh, config)
  losses = []
  with jax.set_mesh(mesh):
    for b in batches:
      state, metrics = step(state, jax.device_put(b, mesh_lib.batch_sharding(mesh)))
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state["params"])


def _dropout_config(**overrides):
  # 32px demo images, 8px patches: 16 patches, 0.5 keeps 8. eps=1e-3 as test_train's parity test.
  return train_config("", **{"model.image.patch_size": 8, "optim.lr": 1e-2, "optim.eps": 1e-3,
                             "model.image.patch_dropout": 0.5, **overrides})


def test_train_step_with_patch_dropout_on_8_devices_equals_1_device():
  # Without the keys the train step adds, a training forward with dropout would raise (above).
  config, batches = _dropout_config(), _clip_batches(count=2)
  one = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  eight = mesh_lib.make_mesh(dict(data=4, fsdp=2, tensor=1))
  losses_1, params_1 = _trajectory(one, config, batches)
  losses_8, params_8 = _trajectory(eight, config, batches)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_8), jax.tree.leaves(params_1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert losses_1[0] != losses_1[-1]                       # it trains


@pytest.mark.slow
def test_accumulation_drops_the_same_tokens_in_both_passes():
  """The cached features of pass 1 and the recomputed ones of pass 2 must see the same subsets,
  or the accumulated gradient is not the full-batch one."""
  batch = _clip_batches(rows=32, count=1)[0]
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2))
  results = {}
  for steps in (1, 4):
    config = _dropout_config(accum_steps=steps, batch_size=32)
    losses, params = _trajectory(mesh, config, [batch, batch])
    results[steps] = losses, params
  np.testing.assert_allclose(results[4][0], results[1][0], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(results[4][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ---- the benchmark's FLOPs count the kept tokens -------------------------------------------------


def test_analytic_flops_count_the_kept_tokens():
  c = tiny_config()
  c.batch_size, c.model.text.context_length = 8, 8
  full = bench.analytic_flops(c, 1, 1)
  c.model.image.patch_dropout = 0.5
  # 2 of 4 patches kept: the blocks see 3 tokens instead of 5 (W=32, 2 layers, r=2); the patch
  # embedding still runs on all 4 patches.
  per_layer = lambda tokens: 2 * tokens * (4 + 2 * 2.0) * 32**2 + 4 * tokens**2 * 32
  assert full - bench.analytic_flops(c, 1, 1) == 3 * 8 * 2 * (per_layer(5) - per_layer(3))


def test_cli_patch_dropout_flag_reaches_validation(tmp_path):
  from tests.test_config import _main
  out = _main("--config=configs/clip.py:demo", f"--workdir={tmp_path}",
              "--config.model.image.patch_dropout=1.0")
  assert out.returncode != 0
  assert "patch_dropout=1.0 must be in [0, 1)" in out.stderr
  assert "compiled" not in out.stderr and not (tmp_path / "checkpoints").exists()
