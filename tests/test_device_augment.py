"""Device-side augmentation (data/device_augment.py): each op for fixed factors against an
independent reference (tf.image, scipy, numpy transcriptions of torchvision's formulas), the
statistics of the random factors, determinism, sharded-vs-single parity, and the train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from xclip_jax import methods
from xclip_jax.data import device_augment as da
from xclip_jax.data import views as views_lib
from xclip_jax.parallel import mesh as mesh_lib

import configs.declip as declip_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
N = 4000                                   # examples for the statistics


def _image(seed=0, size=16):
  """[0, 1] float32 pixels with grey, saturated and clipped ones among them."""
  x = np.random.default_rng(seed).uniform(size=(size, size, 3)).astype(np.float32)
  x[0, :3] = [[0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
  x[1, :2] = [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
  return x


# ---- torchvision's tensor formulas, transcribed to numpy (functional_tensor.py) ---------------

def np_grey(x):
  return 0.2989 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3]


def np_brightness(x, f):                       # _blend(img, zeros_like(img), f)
  return np.clip(f * x, 0, 1)


def np_contrast(x, f):                         # _blend(img, mean(rgb_to_grayscale(img)), f)
  return np.clip(f * x + (1 - f) * np_grey(x).mean(), 0, 1)


def np_saturation(x, f):                       # _blend(img, rgb_to_grayscale(img), f)
  return np.clip(f * x + (1 - f) * np_grey(x), 0, 1)


def np_blur(x, sigma, radius):
  """scipy's sampled Gaussian, separable; mode="nearest" repeats edge pixels."""
  out = scipy.ndimage.gaussian_filter1d(x.astype(np.float64), sigma, axis=0, mode="nearest",
                                        radius=radius)
  return scipy.ndimage.gaussian_filter1d(out, sigma, axis=1, mode="nearest", radius=radius)


# ---- fixed factors ----------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [0.0, 0.6, 1.0, 1.4, 2.5])
def test_brightness_contrast_saturation_match_torchvision_formulas(factor):
  x = _image()
  for ours, ref in ((da.adjust_brightness, np_brightness), (da.adjust_contrast, np_contrast),
                    (da.adjust_saturation, np_saturation)):
    np.testing.assert_allclose(jax.jit(ours)(x, factor), ref(x, factor), atol=1e-6,
                               err_msg=ours.__name__)
  if factor > 1:   # the clamp matters: some pixels saturate at 1
    assert np.any(np.asarray(da.adjust_brightness(x, factor)) == 1.0)


@pytest.mark.parametrize("delta", [-0.5, -0.1, -0.03, 0.0, 0.05, 0.1, 0.37, 0.5])
def test_hue_matches_tf_adjust_hue(delta):
  x = _image(1)
  np.testing.assert_allclose(jax.jit(da.adjust_hue)(x, delta), tf.image.adjust_hue(x, delta),
                             atol=2e-6)


def test_hue_keeps_grey_and_turns_primaries():
  x = np.array([[[0.3, 0.3, 0.3], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], np.float32)
  np.testing.assert_allclose(da.adjust_hue(x, 1 / 3),
                             [[[0.3, 0.3, 0.3], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], atol=1e-6)


def test_grayscale_matches_tf_rgb_to_grayscale():
  x = _image(2)
  ref = np.tile(tf.image.rgb_to_grayscale(x).numpy(), [1, 1, 3])
  np.testing.assert_allclose(da.grayscale(x), ref, atol=1e-6)


def test_saturation_is_not_tf_adjust_saturation():
  # tf scales HSV saturation (a blend with max(R, G, B)); torchvision blends with the luma.
  x = _image(3)
  assert np.abs(np.asarray(da.adjust_saturation(x, 0.5)) -
                tf.image.adjust_saturation(x, 0.5).numpy()).max() > 0.05


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_gaussian_blur_matches_scipy_with_edge_padding(sigma):
  x = _image(4, size=20)
  radius = da.blur_radius(2.0)
  assert radius == 6
  got = jax.jit(da.gaussian_blur, static_argnums=2)(x, sigma, radius)
  np.testing.assert_allclose(got, np_blur(x, sigma, radius), atol=2e-6)


def test_blur_of_an_impulse_is_the_normalised_gaussian():
  x = np.zeros((15, 15, 3), np.float32)
  x[7, 7] = 1.0
  taps = np.exp(-0.5 * (np.arange(-3, 4) / 1.0) ** 2)
  taps /= taps.sum()
  got = np.asarray(da.gaussian_blur(x, 1.0, 3))
  np.testing.assert_allclose(got[4:11, 4:11, 0], np.outer(taps, taps), atol=1e-7)
  assert np.count_nonzero(got[..., 0]) == 49
  np.testing.assert_allclose(np.asarray(da.gaussian_blur(np.full_like(x, 0.4), 1.3, 6)), 0.4,
                             atol=1e-6)                  # a flat image stays flat at the border


def test_flip_and_normalize_match_numpy():
  x = _image(5)
  np.testing.assert_array_equal(da.flip_left_right(x, True), np.flip(x, axis=1))
  np.testing.assert_array_equal(da.flip_left_right(x, False), x)
  pixels = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
  ref = (pixels.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)
  got = da.normalize(pixels, MEAN, STD)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_color_jitter_applies_the_drawn_order():
  x = _image(6)
  factors = dict(brightness=1.3, contrast=0.7, saturation=1.2, hue=0.08)
  recipe = da.Recipe(flip=False, jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=1.0)
  np_ops = {0: lambda y: np_brightness(y, 1.3), 1: lambda y: np_contrast(y, 0.7),
            2: lambda y: np_saturation(y, 1.2),
            3: lambda y: tf.image.adjust_hue(y.astype(np.float32), 0.08).numpy()}
  jitter = jax.jit(da.color_jitter, static_argnums=2)
  results = []
  for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0], [1, 2, 0, 3]):   # hue at each place
    ref = x
    for op in order:
      ref = np_ops[op](ref)
    got = jitter(x, dict(factors, order=jnp.array(order)), recipe)
    np.testing.assert_allclose(got, ref, atol=3e-6, err_msg=str(order))
    results.append(np.asarray(got))
  assert np.abs(results[0] - results[1]).max() > 1e-2        # the order matters
  # Without hue (strength 0) the three blends alone, in the drawn order.
  no_hue = da.Recipe(flip=False, jitter=(0.4, 0.4, 0.4, 0.0), jitter_prob=1.0)
  got = jitter(x, dict(factors, hue=0.0, order=jnp.array([2, 3, 0, 1])), no_hue)
  np.testing.assert_allclose(got, np_ops[1](np_ops[0](np_ops[2](x))), atol=3e-6)
  # Zero strengths draw factor 1 / hue 0: exactly the identity.
  none = da.Recipe(flip=False, jitter=(0.0, 0.0, 0.0, 0.0), jitter_prob=1.0)
  f = da.draw_factors(jax.random.key(0), none)
  assert [float(f[k]) for k in ("brightness", "contrast", "saturation", "hue")] == [1, 1, 1, 0]
  np.testing.assert_array_equal(jitter(x, f, none), x)


# ---- random factors ---------------------------------------------------------------------------

def _moco_recipe(flip=True):
  return da.recipe_for(views_lib.ImageView("image", crop="ssl", augment="moco", flip=flip),
                       declip_config.get_config("vit_b32").data)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _draw(recipe, seed, step, view, n):
  keys = da.example_keys(seed, step, n)
  keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, view)
  return jax.vmap(lambda k: da.draw_factors(k, recipe))(keys)


def _factors(recipe, seed=0, step=0, view=0, n=N):
  """The factors augment_batch draws for view `view` of rows 0..n-1 at `step`."""
  return jax.device_get(_draw(recipe, jnp.int32(seed), jnp.int32(step), jnp.int32(view), n))


def _assert_binomial(flags, p):
  sd = np.sqrt(p * (1 - p) / flags.size)
  assert abs(flags.mean() - p) < 5 * sd, (flags.mean(), p)


def test_factor_ranges_probabilities_and_order():
  recipe = _moco_recipe()
  assert recipe.factor_ranges == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
  f = _factors(recipe)
  for name, (lo, hi) in zip(("brightness", "contrast", "saturation", "hue"), recipe.factor_ranges):
    v = f[name]
    assert lo <= v.min() and v.max() <= hi, name
    assert v.min() < lo + 0.01 * (hi - lo) and v.max() > hi - 0.01 * (hi - lo), name
    assert abs(v.mean() - (lo + hi) / 2) < 5 * (hi - lo) / np.sqrt(12 * N), name
  assert 0.1 <= f["sigma"].min() and f["sigma"].max() <= 2.0
  assert abs(f["sigma"].mean() - 1.05) < 5 * 1.9 / np.sqrt(12 * N)
  _assert_binomial(f["jitter"], 0.8)
  _assert_binomial(f["grayscale"], 0.2)
  _assert_binomial(f["blur"], 0.5)
  _assert_binomial(f["flip"], 0.5)
  np.testing.assert_array_equal(np.sort(f["order"], axis=1), np.tile(np.arange(4), (N, 1)))
  _, counts = np.unique(f["order"], axis=0, return_counts=True)
  assert len(counts) == 24 and np.all(np.abs(counts - N / 24) < 5 * np.sqrt(N / 24))
  assert not _factors(_moco_recipe(flip=False))["flip"].any()


def test_factors_are_independent_across_rows_views_and_steps():
  recipe = _moco_recipe()
  f, g, h = _factors(recipe), _factors(recipe, view=1), _factors(recipe, step=1)
  jitter = np.stack([f[k] for k in ("brightness", "contrast", "saturation", "hue")], axis=1)
  assert len(np.unique(jitter, axis=0)) == N                       # every row its own factors
  bound = 5 / np.sqrt(N)                                           # |correlation| of independents
  pairs = [(f["brightness"], f["contrast"]), (f["brightness"], f["sigma"]),
           (f["brightness"], g["brightness"]), (f["hue"], h["hue"]),
           (f["brightness"][:-1], f["brightness"][1:])]
  for a, b in pairs:
    assert abs(np.corrcoef(a, b)[0, 1]) < bound
  assert abs(np.corrcoef(f["jitter"], f["grayscale"])[0, 1]) < bound
  # A row's keys do not depend on the batch size (nor, hence, on how it is split).
  small = jax.random.key_data(da.example_keys(0, jnp.int32(3), 8))
  large = jax.random.key_data(da.example_keys(0, jnp.int32(3), 64))
  np.testing.assert_array_equal(small, large[:8])


def test_recipes_check_their_settings():
  with pytest.raises(ValueError, match="hue in"):
    da.Recipe(flip=False, jitter=(0.4, 0.4, 0.4, 0.6))
  with pytest.raises(ValueError, match="grayscale_prob=1.5"):
    da.Recipe(flip=False, grayscale_prob=1.5)
  with pytest.raises(ValueError, match="blur_sigma"):
    da.Recipe(flip=False, blur_prob=0.5, blur_sigma=(0.0, 2.0))


# ---- the batch function -----------------------------------------------------------------------

def _pixels(b=16, size=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(b, size, size, 3), dtype=np.uint8)


def _declip_batch_augment(flip=True):
  c = declip_config.get_config("vit_b32")
  c.data.flip = flip
  return da.make_batch_augment(methods.get_method("declip").views, c.data, seed=0), c


def test_batch_uses_the_per_row_factors_and_is_deterministic():
  augment, c = _declip_batch_augment()
  batch = {"image": _pixels(b=8, size=12, seed=0), "image2": _pixels(b=8, size=12, seed=1),
           "text": np.ones((8, 4), np.int32)}
  out = jax.jit(augment)(batch, jnp.int32(7))
  recipe = da.recipe_for(methods.get_method("declip").views.image[1], c.data)
  f = _factors(recipe, step=7, view=1, n=8)
  # Eager (op by op, not compiled): also a check on the compiled program.
  ref = jax.vmap(lambda x, fi: da.standardize(da.apply_recipe(da.to_unit(x), fi, recipe),
                                              c.data.mean, c.data.std))(batch["image2"], f)
  np.testing.assert_allclose(out["image2"], ref, atol=1e-5)
  np.testing.assert_array_equal(out["text"], batch["text"])
  assert out["image"].dtype == jnp.float32 and out["image"].shape == (8, 12, 12, 3)
  again = jax.jit(augment)(batch, jnp.int32(7))
  np.testing.assert_array_equal(out["image"], again["image"])
  other = jax.jit(augment)(batch, jnp.int32(8))
  assert np.abs(np.asarray(other["image"]) - np.asarray(out["image"])).max() > 0.1
  # Float input is read as 0..255 pixels, like uint8.
  as_float = dict(batch, image=batch["image"].astype(np.float32))
  np.testing.assert_allclose(jax.jit(augment)(as_float, jnp.int32(7))["image"], out["image"],
                             atol=1e-6)


def test_batch_on_8_devices_equals_1_device():
  augment, _ = _declip_batch_augment()
  batch = {"image": _pixels(seed=2), "image2": _pixels(seed=3)}

  def run(mesh):
    sharding = mesh_lib.batch_sharding(mesh)
    fn = jax.jit(augment, in_shardings=(sharding, None), out_shardings=sharding)
    with jax.set_mesh(mesh):
      return jax.device_get(fn(jax.device_put(batch, sharding), jnp.int32(4)))

  one = run(mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))
  eight = run(mesh_lib.make_mesh(dict(data=4, fsdp=2, tensor=1)))
  for key in batch:
    # Per-device programs fuse differently: ~1e-6 apart; a pixel level is 1 / 255 / std ~ 0.017.
    np.testing.assert_allclose(eight[key], one[key], atol=1e-5, err_msg=key)


def test_clip_recipe_does_no_colour_work():
  c = declip_config.get_config("vit_b32")
  c.data.flip = True
  slip = methods.get_method("slip").views
  assert slip.image[0].augment == "clip" and not slip.image[0].flips(c.data)
  clip_views = views_lib.Views(image=(views_lib.ImageView("image"),
                                      views_lib.ImageView("image2", flip=False)),
                               text=(views_lib.TextView("text"),))
  augment = da.make_batch_augment(clip_views, c.data, seed=0)
  pixels = _pixels(b=256, size=8)
  out = jax.device_get(jax.jit(augment)({"image": pixels, "image2": pixels}, jnp.int32(0)))
  plain = np.asarray(da.normalize(pixels, c.data.mean, c.data.std))
  # Equal up to float rounding (compiled vs eager); any colour op moves pixels by >= 1e-2.
  same = lambda a, b: np.allclose(a, b, rtol=0, atol=1e-6)
  np.testing.assert_allclose(out["image2"], plain, atol=1e-6)   # flip=False: normalise only
  flipped = np.array([same(o, np.flip(p, axis=1)) for o, p in zip(out["image"], plain)])
  unchanged = np.array([same(o, p) for o, p in zip(out["image"], plain)])
  assert np.all(flipped ^ unchanged)                             # each row: mirrored or as is
  _assert_binomial(flipped, 0.5)


def test_batch_errors_name_the_problem():
  augment, _ = _declip_batch_augment()
  with pytest.raises(KeyError, match=r"image2"):
    augment({"image": _pixels()}, jnp.int32(0))
  with pytest.raises(TypeError, match="uint8"):
    augment({"image": _pixels().astype(np.int32), "image2": _pixels()}, jnp.int32(0))


# ---- across the host -> device boundary, and inside the train step ---------------------------

def test_uint8_views_cross_the_boundary_as_uint8():
  from xclip_jax.data import global_batches, synthetic
  c = declip_config.get_config("demo")
  c.batch_size = 16
  views = methods.get_method("declip").views
  mesh = mesh_lib.make_mesh(dict(data=8))
  sharding = mesh_lib.batch_sharding(mesh)
  host = synthetic.host_batches(c, sharding, start_step=3, views=views)
  with global_batches.GlobalBatchIterator(host, sharding, prefetch=2) as it:
    batch = next(it)
  assert sorted(batch) == sorted(views.keys)
  expected = synthetic.global_batch(c, 3, views)
  for key in ("image", "image2"):
    assert batch[key].dtype == jnp.uint8 and batch[key].sharding == sharding
    assert batch[key].addressable_shards[0].data.nbytes == 2 * 32 * 32 * 3     # 1 byte / value
    np.testing.assert_array_equal(np.asarray(batch[key]), expected[key])
  # Plausible pixels: the whole range, smooth (neighbours close), views of a row alike.
  image = expected["image"].astype(np.float32)
  assert image.min() < 30 and image.max() > 225
  assert np.abs(np.diff(image, axis=2)).mean() < 15
  assert np.abs(image - expected["image2"]).mean() < 15 < np.abs(image - image[::-1]).mean()


def _declip_step(config, augment):
  from xclip_jax import optim
  from xclip_jax import train_state as ts
  from xclip_jax import methods
  from tests.test_declip_model import TEXT_SPEC
  method = methods.get_method("declip")
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2))
  graphdef, params, rest = mesh_lib.create_sharded(
      lambda: methods.build_model(config, eos_id=2, seed=0), mesh)
  tx, schedule = optim.make_optimizer(config, params)
  state = ts.init_train_state(params, rest, tx, mesh, 0,
                              ts.init_method_state(method, config, mesh, 0))
  step = ts.jit_train_step(
      ts.make_train_step(graphdef, tx, schedule, method, config, TEXT_SPEC, augment=augment),
      ts.shardings_of(state), mesh_lib.batch_sharding(mesh), mesh)
  return state, step, mesh


@pytest.mark.slow
def test_train_step_augments_uint8_views_from_its_step_counter():
  from tests.test_declip_model import make_batch, tiny_config
  config = tiny_config()
  config.data.flip = True
  batch = dict(make_batch(), image=_pixels(16, 32, seed=4), image2=_pixels(16, 32, seed=5))
  results = {}
  for augment in (True, False):
    state, step, mesh = _declip_step(config, augment)
    sharding = mesh_lib.batch_sharding(mesh)
    with jax.set_mesh(mesh):
      for s in range(2):    # the second step draws the augmentations of step counter 1
        given = batch
        if not augment:     # the same augmentation done outside the step
          fn = da.make_batch_augment(methods.get_method("declip").views, config.data,
                                     config.seed)
          given = jax.device_get(jax.jit(fn)(batch, jnp.int32(s)))
        state, m = step(state, jax.device_put(given, sharding))
    results[augment] = (jax.device_get(m), jax.device_get(state["params"]))
  (m_on, p_on), (m_off, p_off) = results[True], results[False]
  for name in ("loss", "clip_loss", "simsiam_loss", "mlm_loss"):
    np.testing.assert_allclose(m_on[name], m_off[name], rtol=1e-5, err_msg=name)
  for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_accumulation_sees_the_augmented_batch():
  # Augmenting after the split into micro-batches would give rows other keys: different losses.
  from tests.tiny import tiny_config, tiny_state
  rng = np.random.RandomState(0)
  text = rng.randint(4, 200, size=(32, 32)).astype(np.int32)
  text[:, 9], text[:, 10:] = 2, 0
  batch = {"image": _pixels(32, 32, seed=6), "text": text}
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2))
  results = {}
  for steps in (1, 4):
    config = tiny_config("", **{"model.image.patch_size": 8, "accum_steps": steps,
                                "batch_size": 32, "optim.eps": 1e-3, "data.flip": True})
    state, step = tiny_state(mesh, config)
    with jax.set_mesh(mesh):
      _, m = step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)))
    results[steps] = (float(m["loss"]), float(m["grad_norm"]))
  np.testing.assert_allclose(results[4], results[1], rtol=2e-5)
