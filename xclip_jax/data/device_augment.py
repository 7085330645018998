"""Image arithmetic that runs on the accelerator, inside jitted functions, on uint8 batches.

The host pipeline does only what needs the encoded bytes (decode the crop window, resize) and
sends uint8 pixels; per-pixel work happens here as pure jnp functions. The ops take one image
[H, W, 3] of float32 values in [0, 1]; `augment_batch` vmaps them over a train batch with one
key per example and view, so no factor is shared between rows.

The "moco" recipe follows torchvision's MoCo v2 transforms as DeCLIP and SLIP use them:
  RandomApply(ColorJitter(b, c, s, h), p) -> RandomGrayscale(p) -> RandomApply(GaussianBlur, p)
  -> RandomHorizontalFlip -> Normalize,
with torchvision's tensor semantics:
  brightness  x * f, clamped to [0, 1];               f ~ U[max(0, 1 - b), 1 + b]
  contrast    f * x + (1 - f) * mean(grey(x)), clamped; the mean is over the whole image
  saturation  f * x + (1 - f) * grey(x), clamped
  hue         HSV hue rotated by d of a full turn;     d ~ U[-h, h]
  ColorJitter applies the four in a random order per example (torchvision's randperm).
  grey        ITU-R 601: 0.2989 R + 0.587 G + 0.114 B (RandomGrayscale copies it to 3 channels)
The "clip" recipe is flip (if the view flips) and normalisation only.

Deliberate deviations from the reference:
  - Float32 arithmetic throughout, one cast from uint8. MoCo v2 runs these ops on PIL images,
    which round to uint8 after every op (and round the contrast mean to an integer); that
    quantisation is not reproduced.
  - Gaussian blur: MoCo v2 uses PIL's GaussianBlur(radius=sigma), three box-blur passes that
    approximate a Gaussian and extend edge pixels. Here: an exact sampled Gaussian, separable,
    taps normalised to sum 1, radius ceil(3 * max sigma) for every example (static shapes; 6 px
    for sigma <= 2, so taps beyond 3 sigma of a smaller sigma are ~0), edge padding as PIL's.
    (torchvision's tensor GaussianBlur pads by reflection instead.) sigma is in pixels at the
    view size, as config.data.blur_sigma says.
  - Flip is applied last; it commutes with the colour ops and the symmetric blur.
  - A zero jitter strength is exactly the identity (factor 1; hue=0 skips the HSV round trip,
    as torchvision skips an op of strength 0); a zero probability skips the op statically.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

GREY_WEIGHTS = (0.2989, 0.587, 0.114)     # ITU-R 601, as torchvision and tf.image
_AUGMENT_STREAM = 0x61756720               # separates these keys from other uses of config.seed
_FLIP_PROB = 0.5


# ---- single-image ops on float32 [H, W, 3] in [0, 1] ---------------------------------------------

def to_unit(images: jax.Array) -> jax.Array:
  """0..255 pixels (uint8 or float) -> float32 in [0, 1]: the one cast of the pipeline."""
  return images.astype(jnp.float32) / 255.0


def standardize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """[0, 1] values -> (x - mean) / std per channel."""
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """0..255 pixels (uint8 or float) -> float32 (x / 255 - mean) / std; mean/std per channel in
  [0, 1] units (CLIP's or ImageNet's statistics)."""
  return standardize(to_unit(images), mean, std)


def grey(x: jax.Array) -> jax.Array:
  """[..., 3] -> [..., 1] luma with ITU-R 601 weights."""
  r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
  return GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b


def grayscale(x: jax.Array) -> jax.Array:
  """The luma copied to three channels (torchvision's Grayscale(num_output_channels=3))."""
  return jnp.broadcast_to(grey(x), x.shape)


def adjust_brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(x * factor, 0.0, 1.0)


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  mean = jnp.mean(grey(x))
  return jnp.clip(factor * x + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(factor * x + (1.0 - factor) * grey(x), 0.0, 1.0)


def _wrap6(v: jax.Array) -> jax.Array:
  """v mod 6 by floor (jnp.mod's remainder and sign fix cost ~10x more on CPU)."""
  return v - 6.0 * jnp.floor(v * (1.0 / 6.0))


def adjust_hue(x: jax.Array, delta: jax.Array) -> jax.Array:
  """Rotates the HSV hue by `delta` of a full turn; value and chroma are unchanged.

  The hue is torchvision's _rgb2hsv formula; the way back is the closed form of _hsv2rgb:
  channel n (R=5, G=3, B=1) = V - C * clip(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6.
  """
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  safe = jnp.where(chroma > 0, chroma, 1.0)
  is_r, is_g = value == r, value == g
  # One division: the sextant is offset + (difference of the other two channels) / chroma.
  numerator = jnp.where(is_r, g - b, jnp.where(is_g, b - r, r - g))
  offset = jnp.where(is_r, 0.0, jnp.where(is_g, 2.0, 4.0))
  sextant = _wrap6(offset + numerator / safe + 6.0 * delta)
  channels = []
  for n in (5.0, 3.0, 1.0):
    k = _wrap6(n + sextant)
    channels.append(value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
  return jnp.stack(channels, axis=-1)


def blur_radius(max_sigma: float) -> int:
  """Kernel radius in pixels for every sigma up to max_sigma: ceil(3 * max_sigma), at least 1."""
  return max(1, math.ceil(3.0 * max_sigma))


def gaussian_blur(x: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian blur of one image, taps at -radius..radius summing to 1, edge padding."""
  height, width = x.shape[0], x.shape[1]
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  taps = jnp.exp(-0.5 * jnp.square(offsets / sigma))
  taps = taps / jnp.sum(taps)
  # Barriers keep XLA from fusing a producer into each of the 2r + 1 shifted reads: fused, the
  # vertical pass (and whatever made x) was recomputed per horizontal tap, 12x slower on CPU.
  padded = jnp.pad(jax.lax.optimization_barrier(x),
                   ((radius, radius), (radius, radius), (0, 0)), mode="edge")
  columns = sum(taps[i] * padded[i:i + height] for i in range(2 * radius + 1))
  columns = jax.lax.optimization_barrier(columns)
  return sum(taps[i] * columns[:, i:i + width] for i in range(2 * radius + 1))


def flip_left_right(x: jax.Array, flip: jax.Array) -> jax.Array:
  return jnp.where(flip, x[:, ::-1], x)


# ---- recipes: random factors drawn from a key, then applied --------------------------------------

@dataclasses.dataclass(frozen=True)
class Recipe:
  """An image view's augmentation, static: strengths and probabilities (config.data) and flip."""
  flip: bool
  jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, sat, hue
  jitter_prob: float = 0.0
  grayscale_prob: float = 0.0
  blur_prob: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)

  def __post_init__(self):
    b, c, s, h = self.jitter
    if min(b, c, s) < 0 or not 0 <= h <= 0.5:
      raise ValueError(f"config.data.color_jitter={self.jitter}: brightness, contrast and "
                       f"saturation must be >= 0 and hue in [0, 0.5] (torchvision's bounds).")
    for name, p in (("color_jitter_prob", self.jitter_prob),
                    ("grayscale_prob", self.grayscale_prob), ("blur_prob", self.blur_prob)):
      if not 0 <= p <= 1:
        raise ValueError(f"config.data.{name}={p} must be a probability in [0, 1].")
    lo, hi = self.blur_sigma
    if self.blur_prob > 0 and not 0 < lo <= hi:
      raise ValueError(f"config.data.blur_sigma={self.blur_sigma} must be (lo, hi) with "
                       f"0 < lo <= hi (pixels at the view size).")

  @property
  def factor_ranges(self) -> tuple[tuple[float, float], ...]:
    """torchvision's ranges: [max(0, 1 - s), 1 + s] for b, c, s; [-h, h] for hue."""
    b, c, s, h = self.jitter
    return tuple((max(0.0, 1.0 - v), 1.0 + v) for v in (b, c, s)) + ((-h, h),)


def recipe_for(view, data_config) -> Recipe:
  """The Recipe an ImageView (data/views.py) declares, with config.data's strengths."""
  flip = view.flips(data_config)
  if view.augment == "clip":
    return Recipe(flip=flip)
  d = data_config
  return Recipe(flip=flip, jitter=tuple(float(v) for v in d.color_jitter),
                jitter_prob=float(d.color_jitter_prob), grayscale_prob=float(d.grayscale_prob),
                blur_prob=float(d.blur_prob), blur_sigma=tuple(float(v) for v in d.blur_sigma))


def draw_factors(key: jax.Array, recipe: Recipe) -> dict[str, jax.Array]:
  """One example's random choices: which ops apply, their factors, the jitter order."""
  coin_key, factor_key, order_key, sigma_key = jax.random.split(key, 4)
  coins = jax.random.uniform(coin_key, (4,))
  lo, hi = (jnp.asarray(v, jnp.float32) for v in zip(*recipe.factor_ranges))
  factors = jax.random.uniform(factor_key, (4,), minval=lo, maxval=hi)
  return {
      "jitter": coins[0] < recipe.jitter_prob,
      "brightness": factors[0], "contrast": factors[1], "saturation": factors[2],
      "hue": factors[3],
      "order": jax.random.permutation(order_key, 4),
      "grayscale": coins[1] < recipe.grayscale_prob,
      "blur": coins[2] < recipe.blur_prob,
      "sigma": jax.random.uniform(sigma_key, (), minval=recipe.blur_sigma[0],
                                  maxval=recipe.blur_sigma[1]),
      "flip": (coins[3] < _FLIP_PROB) & recipe.flip,
  }


def _blend(x: jax.Array, op: jax.Array, values: jax.Array) -> jax.Array:
  """Brightness (op 0), contrast (1) or saturation (2): torchvision's blend toward black, the
  image's mean grey or its per-pixel grey, by the factor values[op]; clamped to [0, 1]."""
  luma = grey(x)
  target = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(luma), luma))
  factor = values[op]
  return jnp.clip(factor * x + (1.0 - factor) * target, 0.0, 1.0)


def color_jitter(x: jax.Array, factors: dict[str, jax.Array], recipe: Recipe) -> jax.Array:
  """Brightness, contrast, saturation and hue in the order factors["order"] (a permutation of
  0..3 in that naming). A zero strength draws factor 1 (or hue 0): exactly the identity.

  Vectorised over examples, each position would evaluate every op; instead the blends before
  the hue position run, then the hue once, then the blends after it (6 cheap blends + 1 hue
  rather than 4 of each).
  """
  values = jnp.stack([factors[name] for name in ("brightness", "contrast", "saturation", "hue")])
  order = factors["order"]
  if recipe.jitter[3] == 0:
    for position in range(4):
      x = jnp.where(order[position] == 3, x, _blend(x, order[position], values))
    return x
  hue_at = jnp.argmax(order == 3)
  for position in range(3):
    x = jnp.where(position < hue_at, _blend(x, order[position], values), x)
  x = adjust_hue(x, values[3])
  for position in range(1, 4):
    x = jnp.where(position > hue_at, _blend(x, order[position], values), x)
  return x


def apply_recipe(x: jax.Array, factors: dict[str, jax.Array], recipe: Recipe) -> jax.Array:
  """One [0, 1] image through the recipe with the given factors (no normalisation)."""
  if recipe.jitter_prob > 0 and any(v > 0 for v in recipe.jitter):
    x = jnp.where(factors["jitter"], color_jitter(x, factors, recipe), x)
  if recipe.grayscale_prob > 0:
    x = jnp.where(factors["grayscale"], grayscale(x), x)
  if recipe.blur_prob > 0:
    blurred = gaussian_blur(x, factors["sigma"], blur_radius(recipe.blur_sigma[1]))
    x = jnp.where(factors["blur"], blurred, x)
  if recipe.flip:
    x = flip_left_right(x, factors["flip"])
  return x


def augment_image(image: jax.Array, key: jax.Array, recipe: Recipe, mean: Sequence[float],
                  std: Sequence[float]) -> jax.Array:
  """One uint8 [H, W, 3] image -> augmented, normalised float32, factors drawn from `key`."""
  return standardize(apply_recipe(to_unit(image), draw_factors(key, recipe), recipe), mean, std)


# ---- the train batch --------------------------------------------------------------------------

def example_keys(seed: int, step: jax.Array, batch_size: int) -> jax.Array:
  """One key per global row from (seed, step, row): independent of the device count, and a
  resumed run (same step counter) draws the same augmentations."""
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM), step)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(batch_size))


def make_batch_augment(views, data_config, seed: int
                       ) -> Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]]:
  """(batch, step) -> the batch with every declared image view augmented and normalised.

  `views` is a method's data/views.Views. Image view i of row r at step s uses the key
  fold_in(example_keys(seed, s)[r], i). Other batch entries pass through unchanged. Recipes are
  checked here, before anything is traced.
  """
  recipes = [(i, view.key, recipe_for(view, data_config)) for i, view in enumerate(views.image)]
  # Views with the same recipe (DeCLIP's two, SLIP's SimCLR pair) are augmented by one vmapped
  # program over [batch, views]: one copy of the code to compile, the batch axis untouched.
  groups: dict[Recipe, list[tuple[int, str]]] = {}
  for index, key, recipe in recipes:
    groups.setdefault(recipe, []).append((index, key))
  mean, std = tuple(data_config.mean), tuple(data_config.std)

  def augment_batch(batch: dict[str, jax.Array], step: jax.Array) -> dict[str, jax.Array]:
    missing = [key for _, key, _ in recipes if key not in batch]
    if missing:
      raise KeyError(f"The train batch lacks the image view(s) {missing} that the method "
                     f"declares; it has {sorted(batch)}.")
    for _, key, _ in recipes:
      images = batch[key]
      if images.ndim != 4 or images.shape[-1] != 3 or not (
          images.dtype == jnp.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
        raise TypeError(f"Image view {key!r} must be uint8 (or float 0..255) pixels "
                        f"[batch, S, S, 3]; got {images.dtype} {images.shape}.")
    out = dict(batch)
    row_keys = example_keys(seed, step, batch[recipes[0][1]].shape[0])
    for recipe, members in groups.items():
      images = jnp.stack([batch[key] for _, key in members], axis=1)
      indices = jnp.array([index for index, _ in members])
      keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(indices))(row_keys)
      one = lambda im, k, r=recipe: augment_image(im, k, r, mean, std)
      # Materialised once: the model's first layers read it, not a recomputed fusion of it.
      augmented = jax.lax.optimization_barrier(jax.vmap(jax.vmap(one))(images, keys))
      for position, (_, key) in enumerate(members):
        out[key] = augmented[:, position]
    return out

  return augment_batch
