"""Evaluation image transforms (host side): encoded image -> the model's input pixels.

Two transforms, selected by name (`config.evals.transform`):

  resize_256_crop_224  shorter side to round(S * 256 / 224) (TF bilinear, antialiased), centre
                       S x S crop (offsets floor((H - S) / 2)), float pixels: this project's
                       evaluation since the start.
  openai               OpenAI's / open_clip's: shorter side to S with PIL's bicubic filter
                       (longer side int(S * long / short), torchvision's Resize), uint8, centre
                       S x S crop with torchvision CenterCrop's offsets round((L - S) / 2) (half to
                       even, Python's round). JPEGs are decoded with the accurate integer IDCT,
                       as libjpeg decodes them for PIL.

Both end with normalize ((x / 255 - mean) / std, float32). For `openai` the pixels before
normalising equal torchvision's `Resize(S, BICUBIC), CenterCrop(S)` on a PIL image bit for bit:
TF's own bicubic resize (antialiased) differs from PIL's by up to 5 levels (mean 0.17) on a
500x375 test image, and TF's default JPEG decoding by up to 5 levels, so the resize runs in PIL
(`tf.numpy_function`; PIL releases the GIL, and it took 3.3 ms per 500x375 image against 3.7 ms
for TF's resize) and JPEGs are decoded with dct_method="INTEGER_ACCURATE" (0 levels apart).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

TRANSFORMS = ("resize_256_crop_224", "openai")


def check_transform(name: str) -> str:
  if name not in TRANSFORMS:
    raise ValueError(f"config.evals.transform={name!r} is not one of {list(TRANSFORMS)}: "
                     "'openai' is OpenAI's bicubic resize to the model size + centre crop, "
                     "'resize_256_crop_224' resizes to 256/224 of it, then crops.")
  return name


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded image -> uint8 [H, W, 3]; JPEGs with the accurate integer IDCT (libjpeg's default,
  so equal to PIL's decoding), other formats with tf.io.decode_image."""
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def resize_shorter_side(image: tf.Tensor, shorter: int) -> tf.Tensor:
  """Resizes keeping the aspect ratio so that min(H, W) == shorter; float32 output."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  factor = tf.cast(shorter, tf.float32) / tf.reduce_min(shape)
  new_hw = tf.cast(tf.math.round(shape * factor), tf.int32)
  new_hw = tf.maximum(new_hw, shorter)   # rounding must never leave a side below `shorter`
  return tf.image.resize(image, new_hw, method="bilinear", antialias=True)


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The size x size window in the middle of an image at least that large."""
  hw = tf.shape(image)[:2]
  top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
  crop = tf.slice(image, [top, left, 0], [size, size, -1])
  crop.set_shape([size, size, image.shape[-1]])
  return crop


def openai_resize_crop(pixels: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3] exactly as torchvision's Resize(size, BICUBIC) +
  CenterCrop(size) do on a PIL image (the preprocessing of OpenAI's CLIP and open_clip)."""
  from PIL import Image  # noqa: PLC0415
  h, w = pixels.shape[:2]
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  resized = np.asarray(Image.fromarray(np.asarray(pixels, np.uint8)).resize(
      (new_w, new_h), Image.BICUBIC))
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return np.ascontiguousarray(resized[top:top + size, left:left + size])


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """0..255 pixels -> (x / 255 - mean) / std, float32; mean/std per channel in [0, 1] units."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def crop_pixels(image: tf.Tensor, *, size: int, transform: str) -> tf.Tensor:
  """Decoded uint8 [H, W, 3] -> [size, size, 3] pixels in 0..255 (float32 for
  resize_256_crop_224, uint8 for openai), before normalisation."""
  if check_transform(transform) == "openai":
    crop = tf.numpy_function(lambda x: openai_resize_crop(x, size), [image], tf.uint8,
                             stateful=False)
    crop.set_shape([size, size, 3])
    return crop
  return central_crop(resize_shorter_side(image, int(round(size * 256 / 224))), size)


def eval_transform(encoded: tf.Tensor, *, size: int, mean: Sequence[float],
                   std: Sequence[float], transform: str = "resize_256_crop_224") -> tf.Tensor:
  """Encoded bytes -> normalised float32 [size, size, 3] under the named transform."""
  image = decode(encoded) if transform == "openai" else _decode_any(encoded)
  return normalize(crop_pixels(image, size=size, transform=transform), mean, std)


def _decode_any(encoded: tf.Tensor) -> tf.Tensor:
  # The transform's historical decoder (TF's default JPEG IDCT), kept so its results stay as
  # they were.
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image
