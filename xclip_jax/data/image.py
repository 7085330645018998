"""Image ops for the input pipelines: decode, header sizes, normalisation (the eval transforms:
eval_image.py).

`decode` and `normalize` are functions of tf.Tensors; the header readers take the encoded bytes
(Python, a microsecond per record: the train pipeline reads them for a chunk of records at once).
The train views' crops (one decode per record) are in view_crops.py; their per-pixel
augmentation runs on the device (device_augment.py).
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
JPEG_END = b"\xff\xd9"                   # the end-of-image marker, the last bytes of a whole JPEG
_PNG_END = b"IEND\xaeB`\x82"            # the IEND chunk's type and CRC, the end of a whole PNG
# JPEG frame headers (SOF0..SOF15 but DHT, JPG, DAC), and the markers without a length field.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH = frozenset(range(0xD0, 0xD8)) | {0x01}


def jpeg_size(data: bytes) -> tuple[int, int]:
  """(height, width) from a JPEG's frame header without decoding; (-1, -1) if unreadable.

  Walks the segments as libjpeg's marker reader does: stray bytes before a marker and fill
  bytes (0xFF) are skipped; an end-of-image or start-of-scan before any frame header, a second
  start-of-image, a zero height (a DNL marker, which libjpeg refuses) or a cut header fail.
  """
  if data[:2] != b"\xff\xd8":
    return -1, -1
  i, n = 2, len(data)
  while True:
    i = data.find(b"\xff", i)
    if i < 0:
      return -1, -1
    while i < n and data[i] == 0xFF:
      i += 1
    if i >= n:
      return -1, -1
    marker, i = data[i], i + 1
    if marker == 0 or marker in _NO_LENGTH:        # a stuffed 0xFF byte, RSTn, TEM
      continue
    if marker in (0xD8, 0xD9, 0xDA):
      return -1, -1
    if marker in _SOF_MARKERS:
      if i + 7 > n:
        return -1, -1
      height, width = (data[i + 3] << 8) | data[i + 4], (data[i + 5] << 8) | data[i + 6]
      return (height, width) if height and width else (-1, -1)
    if i + 2 > n:
      return -1, -1
    i += (data[i] << 8) | data[i + 1]


def header_size(data: bytes) -> tuple[str, int, int]:
  """(format, height, width) read from an encoded image's header without decoding it.

  format: "jpeg" (size -1 if its header is unreadable: libjpeg would refuse it too), "png"
  (IHDR's size), or "other" (GIF, BMP, WebP, or no image at all: size -1; tf.io.decode_image
  decides). Lets a pipeline refuse a decompression bomb before anything allocates it.
  """
  if data[:3] == b"\xff\xd8\xff":
    return ("jpeg", *jpeg_size(data))
  if len(data) >= 24 and data[:8] == _PNG_SIGNATURE:
    return "png", int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
  return "other", -1, -1


def is_complete(data: bytes, fmt: str) -> bool:
  """Whether the data ends as a whole file of that format does (a JPEG with its end-of-image
  marker, a PNG with its IEND chunk): False for a truncated file, or one with bytes appended."""
  if fmt == "jpeg":
    return data.endswith(JPEG_END)
  return fmt == "png" and data.endswith(_PNG_END)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """0..255 pixels -> (x / 255 - mean) / std, float32; mean/std are per channel in [0, 1] units."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)

