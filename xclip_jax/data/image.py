"""Image ops for tf.data: decode, CLIP's train augmentation, the eval transform, normalisation.

Pure functions of tf.Tensors. Random ops are *stateless*: each takes a `seed` (int tensor [2]), so
a pipeline that derives per-example seeds from (config.seed, example counter) is reproducible.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

# torchvision RandomResizedCrop's defaults.
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/BMP/GIF bytes -> uint8 [H, W, 3] (grey is expanded, alpha dropped)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encoded_pixels(encoded: tf.Tensor) -> tf.Tensor:
  """H * W (int64) read from a JPEG or PNG header without decoding; -1 for other formats.

  Lets a pipeline refuse a decompression bomb before `decode` allocates it. A corrupt JPEG
  header raises, like `decode` would.
  """
  def png_pixels():
    raw = tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.uint8)   # IHDR width, height
    values = tf.cast(tf.reshape(raw, [2, 4]), tf.int64)
    sides = tf.reduce_sum(values * tf.constant([2**24, 2**16, 2**8, 1], tf.int64), axis=1)
    return sides[0] * sides[1]

  def jpeg_pixels():
    return tf.reduce_prod(tf.cast(tf.io.extract_jpeg_shape(encoded)[:2], tf.int64))

  is_png = tf.logical_and(tf.strings.length(encoded) >= 24,
                          tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE))
  return tf.case([(tf.io.is_jpeg(encoded), jpeg_pixels), (is_png, png_pixels)],
                 default=lambda: tf.constant(-1, tf.int64))


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor,
                        scale: Sequence[float] = DEFAULT_SCALE,
                        ratio: Sequence[float] = DEFAULT_RATIO) -> tf.Tensor:
  """A crop covering `scale` of the area with aspect ratio in `ratio`, resized to float32 [size, size, 3].

  Like torchvision's RandomResizedCrop: up to 10 attempts to sample a box that fits, falling back
  to the whole image. Values stay in the input's range (0..255 for uint8 input).
  """
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  # antialias: the crop is usually downscaled (64px demo source -> 32px, 256+ -> 224).
  resized = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
  resized.set_shape([size, size, 3])
  return resized


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """0..255 pixels -> (x / 255 - mean) / std, float32; mean/std are per channel in [0, 1] units."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def train_transform(encoded: tf.Tensor, seed: tf.Tensor, *, size: int,
                    scale: Sequence[float], flip: bool, mean: Sequence[float],
                    std: Sequence[float]) -> tf.Tensor:
  """Decode -> random resized crop -> optional flip -> normalise: float32 [size, size, 3]."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = random_resized_crop(decode(encoded), size, crop_seed, scale=scale)
  if flip:
    image = random_flip(image, flip_seed)
  return normalize(image, mean, std)


# The evaluation transforms live in eval_image.py; these names keep working from here.
from xclip_jax.data.eval_image import (  # noqa: E402,F401
    central_crop, eval_transform, resize_shorter_side)


# ---- MoCo v2's augmentation (DeCLIP's two image views) ---------------------------------------------


def _uniform(seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed, low, high)


def _apply_with_prob(image: tf.Tensor, prob: float, seed: tf.Tensor, fn) -> tf.Tensor:
  coin_seed, fn_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if prob <= 0:
    return image
  return tf.cond(_uniform(coin_seed, 0.0, 1.0) < prob, lambda: fn(image, fn_seed), lambda: image)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, *, brightness: float, contrast: float,
                 saturation: float, hue: float) -> tf.Tensor:
  """torchvision's ColorJitter on [0, 1] float images, in a fixed order (torchvision shuffles it).

  Brightness, contrast and saturation factors are drawn from [1 - s, 1 + s]; hue shifts by
  [-hue, hue] of a full turn.
  """
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  image = image * _uniform(seeds[0], 1 - brightness, 1 + brightness)
  image = tf.image.adjust_contrast(tf.clip_by_value(image, 0, 1),
                                   _uniform(seeds[1], 1 - contrast, 1 + contrast))
  image = tf.image.adjust_saturation(tf.clip_by_value(image, 0, 1),
                                     _uniform(seeds[2], 1 - saturation, 1 + saturation))
  image = tf.image.adjust_hue(tf.clip_by_value(image, 0, 1), _uniform(seeds[3], -hue, hue))
  return tf.clip_by_value(image, 0, 1)


def grayscale(image: tf.Tensor) -> tf.Tensor:
  return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, max_sigma: float) -> tf.Tensor:
  """Separable Gaussian blur with reflect padding; kernel radius ceil(3 * max_sigma), <= H/2."""
  size = image.shape[0]
  radius = max(1, min(int(-(-3 * max_sigma // 1)), (size - 1) // 2))
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(x / sigma))
  kernel = kernel / tf.reduce_sum(kernel)
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
  horizontal = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])
  vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
  out = tf.nn.depthwise_conv2d(padded, horizontal, [1, 1, 1, 1], "VALID")
  out = tf.nn.depthwise_conv2d(out, vertical, [1, 1, 1, 1], "VALID")
  return out[0]


def view_transform(encoded: tf.Tensor, seed: tf.Tensor, *, size: int, scale: Sequence[float],
                   flip: bool, jitter: Sequence[float], jitter_prob: float, grayscale_prob: float,
                   blur_prob: float, blur_sigma: Sequence[float], mean: Sequence[float],
                   std: Sequence[float]) -> tf.Tensor:
  """MoCo v2 (as DeCLIP uses it): random resized crop, colour jitter (p), grayscale (p),
  Gaussian blur (p), flip, normalise -> float32 [size, size, 3]."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
  image = random_resized_crop(decode(encoded), size, seeds[0], scale=scale) / 255.0
  b, c, s, h = jitter
  image = _apply_with_prob(image, jitter_prob, seeds[1], lambda x, sd: color_jitter(
      x, sd, brightness=b, contrast=c, saturation=s, hue=h))
  image = _apply_with_prob(image, grayscale_prob, seeds[2], lambda x, sd: grayscale(x))
  lo, hi = blur_sigma
  image = _apply_with_prob(image, blur_prob, seeds[3], lambda x, sd: gaussian_blur(
      x, _uniform(sd, lo, hi), hi))
  if flip:
    image = random_flip(image, seeds[4])
  image.set_shape([size, size, 3])
  return normalize(image * 255.0, mean, std)
