"""Image ops for tf.data: decode, header sizes, normalisation (the eval transforms: eval_image.py).

Pure functions of tf.Tensors. The train views' crops (one decode per record) are in
view_crops.py; their per-pixel augmentation runs on the device (device_augment.py).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/BMP/GIF bytes -> uint8 [H, W, 3] (grey is expanded, alpha dropped)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A valid 1x1 JPEG: stand-in bytes where a JPEG header is read from something that is no JPEG.
TINY_JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010101012c012c0000ffdb00430050373c463c32504641465a55505f78c882786e"
    "6e78f5afb991c8ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"
    "ffffc0000b080001000101011100ffc4001f0000010501010101010100000000000000000102030405060708"
    "090a0bffc400b5100002010303020403050504040000017d0102030004110512213141061351610722711432"
    "8191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a43444546474849"
    "4a535455565758595a636465666768696a737475767778797a838485868788898a92939495969798999aa2a3"
    "a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9ea"
    "f1f2f3f4f5f6f7f8f9faffda0008010100003f00a55fffd9")
# A valid 1x1 PNG: stand-in bytes where a header field is read from something that is no PNG.
_TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478"
    "9c63f8cfc0000003010100c9fe92ef0000000049454e44ae426082")


def encoded_pixels(encoded: tf.Tensor) -> tf.Tensor:
  """H * W (int64) read from a JPEG or PNG header without decoding; -1 for other formats.

  Lets a pipeline refuse a decompression bomb before `decode` allocates it. A corrupt JPEG
  header raises, like `decode` would. Branch-free (a per-record tf.case costs more than this).
  """
  is_jpeg = tf.io.is_jpeg(encoded)
  is_png = tf.logical_and(tf.strings.length(encoded) >= 24,
                          tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE))
  jpeg_hw = tf.io.extract_jpeg_shape(tf.where(is_jpeg, encoded, TINY_JPEG))[:2]
  # IHDR's width and height, big-endian, at bytes 16..23 (of a stand-in when this is no PNG).
  ihdr = tf.io.decode_raw(tf.strings.substr(tf.where(is_png, encoded, _TINY_PNG), 16, 8),
                          tf.uint8)
  values = tf.cast(tf.reshape(ihdr, [2, 4]), tf.int64)
  png_hw = tf.reduce_sum(values * tf.constant([2**24, 2**16, 2**8, 1], tf.int64), axis=1)
  pixels = tf.where(is_jpeg, tf.reduce_prod(tf.cast(jpeg_hw, tf.int64)), tf.reduce_prod(png_hw))
  return tf.where(is_jpeg | is_png, pixels, tf.constant(-1, tf.int64))


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """0..255 pixels -> (x / 255 - mean) / std, float32; mean/std are per channel in [0, 1] units."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)

