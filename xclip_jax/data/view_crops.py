"""The host half of a record's image views: crop windows, ONE decode, a uint8 crop per view.

Everything else a view needs (flip, colour jitter, grayscale, blur, normalisation) is arithmetic
and runs on the accelerator (data/device_augment.py); the host does only what needs the bytes.

Per record, `decode_views`:
  1. reads the image's size from its JPEG header, without decoding it,
  2. draws every view's crop window with torchvision's RandomResizedCrop rule (scale, aspect
     ratio in (3/4, 4/3) log-uniform, up to 10 attempts, then the centred fallback),
  3. decodes ONE window, the union of the views' windows (`tf.io.decode_and_crop_jpeg`): rows
     and columns outside it are not converted, and for a large image, where every view's crop
     is at least 2x, 4x or 8x the output size on both sides, libjpeg scales the window down by
     that factor in the DCT (cheaper than decoding at full size and resizing, and a proper
     low-pass filter). PNG, GIF and BMP have no partial decoding: one full decode, and the
     windows are drawn from the decoded size;
  4. cuts each view's crop from it and resizes it to [size, size]: bilinear with half-pixel
     centres, antialiased (a triangle filter as wide as the reduction, PIL's bilinear) only when
     a side shrinks by more than `antialias_above` (2 by default). At 256 px sources, img2dataset's usual output,
     a CLIP crop shrinks by at most 1.5x and a self-supervised crop is mostly enlarged: there
     plain bilinear is what PIL, i.e. torchvision, computes up to rounding, at a quarter of the
     cost of TF's antialiased resize. (big_vision's inception crop resizes bilinear without
     antialiasing everywhere; torchvision always antialiases, which matters only for larger
     reductions, and those are antialiased here too.)
  5. rounds to uint8.

A JPEG whose data does not end with the end-of-image marker (truncated, or bytes after it) is
decoded down to its last row, so the decoder reads all of its data and fails exactly where a full
decode fails: a truncated file is never accepted because its damage lies below the crop.

Random choices are stateless: each view's window follows from its seed (int tensor [2]) alone.
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from xclip_jax.data import image as image_lib

# torchvision RandomResizedCrop's defaults.
DEFAULT_RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10
# Above this reduction (crop side / output side) the resize is antialiased (config.data.
# antialias_above; the demo's 64 -> 32 px crops use 1.0, antialiasing every reduction).
ANTIALIAS_ABOVE = 2.0
# libjpeg's DCT scaling factors (tf.io.decode_and_crop_jpeg's `ratio`).
DCT_RATIOS = (1, 2, 4, 8)
_JPEG_END = b"\xff\xd9"


# ---- crop windows -------------------------------------------------------------------------------

def window_from_uniforms(height: tf.Tensor, width: tf.Tensor, uniforms: tf.Tensor,
                         scale: tf.Tensor | Sequence[float],
                         ratio: Sequence[float] = DEFAULT_RATIO) -> tf.Tensor:
  """torchvision's RandomResizedCrop.get_params, driven by given uniforms in [0, 1).

  uniforms: float32 [..., 4, ATTEMPTS]: per attempt, the area fraction, the log aspect ratio, the
  top and the left offset; scale: [..., 2] (or a pair). The first attempt whose rounded box fits
  is taken; if none fits, the largest centred box with an aspect ratio within `ratio`.
  Returns int32 [..., 4]: top, left, h, w. Leading axes: several windows at once (one per view).
  """
  h_img, w_img = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  scale = tf.constant(scale, tf.float32) if not isinstance(scale, tf.Tensor) else scale
  lo, hi = scale[..., 0:1], scale[..., 1:2]
  area = h_img * w_img
  target = area * (lo + (hi - lo) * uniforms[..., 0, :])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * uniforms[..., 1, :])
  w = tf.round(tf.sqrt(target * aspect))          # round half to even, as Python's round()
  h = tf.round(tf.sqrt(target / aspect))
  fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=-1, output_type=tf.int32)[..., None]

  def pick(x):                                     # x[..., first] for each leading index
    return tf.gather(x, first, axis=-1, batch_dims=first.shape.rank - 1)[..., 0]

  h1, w1 = pick(h), pick(w)
  # torch.randint(0, n + 1): an integer in [0, n].
  top = tf.minimum(tf.floor(pick(uniforms[..., 2, :]) * (h_img - h1 + 1)), h_img - h1)
  left = tf.minimum(tf.floor(pick(uniforms[..., 3, :]) * (w_img - w1 + 1)), w_img - w1)
  # The fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
  in_ratio = w_img / h_img
  w2 = tf.where(in_ratio > ratio[1], tf.round(h_img * ratio[1]), w_img)
  h2 = tf.where(in_ratio < ratio[0], tf.round(w_img / ratio[0]), h_img)
  fallback = tf.stack([tf.floor((h_img - h2) / 2), tf.floor((w_img - w2) / 2), h2, w2])
  found = tf.reduce_any(fits, axis=-1, keepdims=True)
  box = tf.where(found, tf.stack([top, left, h1, w1], axis=-1), fallback)
  return tf.cast(box, tf.int32)


def crop_windows(height: tf.Tensor, width: tf.Tensor, seeds: Sequence[tf.Tensor],
                 scales: Sequence[Sequence[float]],
                 ratio: Sequence[float] = DEFAULT_RATIO) -> tf.Tensor:
  """One RandomResizedCrop window per (seed, scale) of an image of that size: int32 [V, 4]
  (the windows decode_views cuts for those seeds)."""
  uniforms = tf.stack([tf.random.stateless_uniform([4, ATTEMPTS], seed) for seed in seeds])
  return window_from_uniforms(height, width, uniforms, tf.constant(scales, tf.float32), ratio)


# ---- one decode, every view ---------------------------------------------------------------------

def resize_crop(crop: tf.Tensor, size: int, antialias: bool | tf.Tensor = False) -> tf.Tensor:
  """uint8 [h, w, 3] -> uint8 [size, size, 3]: bilinear, antialiased if `antialias`."""
  image = tf.cast(crop, tf.float32)
  if isinstance(antialias, bool):
    resized = tf.image.resize(image, [size, size], antialias=antialias)
  else:
    resized = tf.cond(antialias,
                      lambda: tf.image.resize(image, [size, size], antialias=True),
                      lambda: tf.image.resize(image, [size, size]))
  # Both filters average with non-negative weights: values stay in [0, 255]; +0.5 rounds.
  out = tf.cast(resized + 0.5, tf.uint8)
  out.set_shape([size, size, 3])
  return out


def decode_views(encoded: tf.Tensor, seeds: Sequence[tf.Tensor], scales: Sequence[Sequence[float]],
                 size: int, antialias_above: float = ANTIALIAS_ABOVE) -> list[tf.Tensor]:
  """Encoded image bytes -> one uint8 [size, size, 3] RandomResizedCrop per (seed, scale).

  One decode serves all views. A crop whose longer side exceeds antialias_above * size is
  resized with antialiasing (1.0: every reduction, as torchvision). Raises (inside tf.data: the
  record is dropped) on bytes that do not decode, like tf.io.decode_image would.
  """
  if not seeds:
    return []
  uniforms = tf.stack([tf.random.stateless_uniform([4, ATTEMPTS], seed) for seed in seeds])
  scales = tf.constant([tuple(float(x) for x in s) for s in scales], tf.float32)
  is_jpeg = tf.io.is_jpeg(encoded)
  # The header of a stand-in JPEG when this is none: no branch needed to read a size.
  shape = tf.io.extract_jpeg_shape(tf.where(is_jpeg, encoded, image_lib.TINY_JPEG))
  height, width = shape[0], shape[1]
  boxes = window_from_uniforms(height, width, uniforms, scales)        # [V, 4], full size
  top, left = tf.reduce_min(boxes[:, 0]), tf.reduce_min(boxes[:, 1])
  bottom = tf.reduce_max(boxes[:, 0] + boxes[:, 2])
  right = tf.reduce_max(boxes[:, 1] + boxes[:, 3])
  complete = tf.equal(tf.strings.substr(encoded, tf.strings.length(encoded) - 2, 2), _JPEG_END)
  bottom = tf.where(complete, bottom, height)              # see the module docstring
  # DCT scaling by the largest factor that leaves every view's crop at least `size` a side.
  dct = tf.reduce_sum(tf.cast(tf.reduce_min(boxes[:, 2:]) >= size * tf.constant(DCT_RATIOS[1:]),
                              tf.int32))
  ratio = tf.gather(DCT_RATIOS, dct)
  up = lambda x: -(-x // ratio)  # noqa: E731   (libjpeg's scaled side: ceil(side / ratio))
  y0, x0 = top // ratio, left // ratio
  y1, x1 = tf.minimum(up(bottom), up(height)), tf.minimum(up(right), up(width))
  window = tf.stack([y0, x0, y1 - y0, x1 - x0])              # in scaled pixels
  b0, b1 = boxes[:, 0] // ratio - y0, boxes[:, 1] // ratio - x0
  jpeg_boxes = tf.stack([b0, b1, tf.minimum(up(boxes[:, 0] + boxes[:, 2]), y1) - y0 - b0,
                         tf.minimum(up(boxes[:, 1] + boxes[:, 3]), x1) - x0 - b1], axis=1)
  n_views = len(seeds)

  def cut(image, crop_boxes):
    # (A slice of the whole window, the usual one-view case, is free: TF forwards the input.)
    return [tf.slice(image, tf.stack([crop_boxes[i, 0], crop_boxes[i, 1], 0]),
                     tf.stack([crop_boxes[i, 2], crop_boxes[i, 3], 3]))
            for i in range(n_views)], crop_boxes

  def jpeg(ratio_attr):
    return lambda: cut(tf.io.decode_and_crop_jpeg(encoded, window, channels=3, ratio=ratio_attr),
                       jpeg_boxes)

  def other():
    # Decoded whole (no header read): the windows are drawn from the decoded size, with the
    # same uniforms.
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    decoded = tf.shape(image)
    return cut(image, window_from_uniforms(decoded[0], decoded[1], uniforms, scales))

  # One decode. Keep the branches small: the ops of branches not taken still cost a little.
  crops, boxes = tf.switch_case(tf.where(is_jpeg, dct, len(DCT_RATIOS)),
                                [jpeg(r) for r in DCT_RATIOS] + [other])
  views = []
  for i, crop in enumerate(crops):
    crop.set_shape([None, None, 3])
    shrinks = tf.reduce_max(boxes[i, 2:]) > int(antialias_above * size)
    views.append(resize_crop(crop, size, shrinks))
  return views
