"""The host half of the image views: crop windows, ONE decode per record, a uint8 crop per view.

Everything else a view needs (flip, colour jitter, grayscale, blur, normalisation) is arithmetic
and runs on the accelerator (data/device_augment.py); the host does only what needs the bytes.
The work is split by what each step costs per record, so that a record pays for its decode and
its resizes and little else (TF graph ops cost ~3 us each per record; numpy over a chunk of
records, and one graph of a chunk's decodes, cost that once per chunk):

  1. `plan_decodes` (numpy, a whole chunk at once): each view's crop window drawn with
     torchvision's RandomResizedCrop rule (`window_from_uniforms`: scale, aspect ratio in
     (3/4, 4/3) log-uniform, up to 10 attempts, then the centred fallback) from the image size
     in its header (image.header_size), and what to decode: the union of the views' windows,
     and for a large JPEG, where every view's crop is at least 2x, 4x or 8x the output size on
     both sides, the DCT scaling libjpeg can apply by that factor (cheaper than decoding at full
     size and resizing, and a proper low-pass filter); where the window saves too little
     (most of the image, as a CLIP crop on 256 px sources is: see WINDOW_OVERHEAD), the whole
     image instead, at the same scaling, the crops cut from it as torchvision cuts them;
  2. `decode_windows` (TF, one decode op per record of the chunk): ONE decode per record,
     `tf.io.decode_and_crop_jpeg` of the union window (rows and columns outside it are not
     converted) or `tf.io.decode_jpeg` of the whole image. PNG, GIF, BMP and WebP have no
     partial decoding: one full decode, and their windows are drawn from the decoded size
     with the same uniforms;
  3. `resize_views` (numpy, the chunk at once): each view's crop cut from its record's decoded
     window and resized to [size, size], uint8: bilinear with half-pixel centres (OpenCV's
     INTER_LINEAR, 11-bit fixed-point weights: within 1 level of the exact value) where a crop
     is enlarged or shrinks by at most `antialias_above` (2 by default), and PIL's antialiased
     bilinear filter, i.e. torchvision's exactly, where it shrinks more. At 256 px sources,
     img2dataset's usual output, a CLIP crop shrinks by at most 1.5x and a self-supervised
     crop is mostly enlarged: there plain bilinear is what PIL computes up to rounding, at a
     fraction of the cost. (big_vision's inception crop resizes bilinear without antialiasing
     everywhere; torchvision always antialiases, which matters only for larger reductions, and
     those are antialiased here too.) OpenCV and PIL release the GIL while they compute.

A JPEG whose data does not end with the end-of-image marker (truncated, or bytes after it) is
decoded down to its last row, so the decoder reads all of its data and fails exactly where a full
decode fails: a truncated file is never accepted because its damage lies below the crop.

Random choices come in as uniforms in [0, 1), [..., 4, ATTEMPTS] per view: the caller derives
them statelessly from (seed, record position), so every window follows from those alone.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
import tensorflow as tf
from PIL import Image

from xclip_jax.data import image as image_lib

# torchvision RandomResizedCrop's defaults.
DEFAULT_RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10
UNIFORMS_PER_VIEW = 4 * ATTEMPTS
# Above this reduction (crop side / output side) the resize is antialiased (config.data.
# antialias_above; the demo's 64 -> 32 px crops use 1.0, antialiasing every reduction).
ANTIALIAS_ABOVE = 2.0
# libjpeg's DCT scaling factors (tf.io.decode_and_crop_jpeg's `ratio`).
DCT_RATIOS = (1, 2, 4, 8)
# Decode kinds: 0..3 a JPEG window at DCT_RATIOS[kind]; WHOLE + 0..3 a whole JPEG at that
# ratio; OTHER a non-JPEG decoded whole; SKIP nothing (a record already dropped).
WHOLE = len(DCT_RATIOS)
OTHER = 2 * len(DCT_RATIOS)
SKIP = OTHER + 1
# When a JPEG's window is decoded rather than the whole image: libjpeg's cropped decode still
# entropy-decodes every row above the window's bottom (it skips the IDCT and colour conversion
# of the rest), and TF copies its rows out of a scratch buffer. Measured on 256-384 px photos
# (CPU per record, libjpeg-turbo in TF): a window spanning the whole image costs ~10% more than
# a whole decode; rows below the window save ~80% of their share, columns beside it ~20%. So
# the window is decoded only where ROW_SAVING * (rows below) + COLUMN_SAVING * (rest of the
# area outside it), as fractions of the image, exceed WINDOW_OVERHEAD.
ROW_SAVING, COLUMN_SAVING, WINDOW_OVERHEAD = 0.8, 0.2, 0.1

# The parallelism comes from tf.data (chunks in flight), not from threads inside one resize.
cv2.setNumThreads(1)


# ---- crop windows -------------------------------------------------------------------------------

def window_from_uniforms(height, width, uniforms, scale,
                         ratio: Sequence[float] = DEFAULT_RATIO) -> np.ndarray:
  """torchvision's RandomResizedCrop.get_params, driven by given uniforms in [0, 1).

  uniforms: [..., 4, ATTEMPTS]: per attempt, the area fraction, the log aspect ratio, the top
  and the left offset; height, width: broadcastable to uniforms' leading axes [...]; scale:
  [..., 2] (or a pair). The first attempt whose rounded box fits is taken; if none fits, the
  largest centred box with an aspect ratio within `ratio`. float64, as torchvision's Python
  arithmetic. Returns int32 [..., 4]: top, left, h, w.
  """
  u = np.asarray(uniforms, np.float64)
  h_img = np.broadcast_to(np.asarray(height, np.float64), u.shape[:-2])
  w_img = np.broadcast_to(np.asarray(width, np.float64), u.shape[:-2])
  scale = np.asarray(scale, np.float64)
  lo, hi = scale[..., 0:1], scale[..., 1:2]
  area = (h_img * w_img)[..., None]
  target = area * (lo + (hi - lo) * u[..., 0, :])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1, :])
  w = np.round(np.sqrt(target * aspect))          # round half to even, as Python's round()
  h = np.round(np.sqrt(target / aspect))
  fits = (w > 0) & (w <= w_img[..., None]) & (h > 0) & (h <= h_img[..., None])
  first = np.argmax(fits, axis=-1)[..., None]

  def pick(x):                                     # x[..., first] for each leading index
    return np.take_along_axis(x, first, axis=-1)[..., 0]

  h1, w1 = pick(h), pick(w)
  # torch.randint(0, n + 1): an integer in [0, n].
  top = np.minimum(np.floor(pick(u[..., 2, :]) * (h_img - h1 + 1)), h_img - h1)
  left = np.minimum(np.floor(pick(u[..., 3, :]) * (w_img - w1 + 1)), w_img - w1)
  # The fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
  with np.errstate(divide="ignore", invalid="ignore"):
    in_ratio = w_img / h_img
  w2 = np.where(in_ratio > ratio[1], np.round(h_img * ratio[1]), w_img)
  h2 = np.where(in_ratio < ratio[0], np.round(w_img / ratio[0]), h_img)
  fallback = np.stack([np.floor((h_img - h2) / 2), np.floor((w_img - w2) / 2), h2, w2], -1)
  found = fits.any(axis=-1)[..., None]
  return np.where(found, np.stack([top, left, h1, w1], -1), fallback).astype(np.int32)


def plan_decodes(heights, widths, is_jpeg, complete, uniforms, scales, size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """What to decode for each record of a chunk, and where its views' crops lie in it.

  heights, widths: [B] image sizes from the headers; is_jpeg, complete (ends with the
  end-of-image marker): [B] bool; uniforms: [B, V, 4, ATTEMPTS]; scales: [V, 2].
  Returns (kinds [B] int32: DCT ratio index for a JPEG window, WHOLE + that index for a whole
  JPEG, OTHER otherwise; windows [B, 4] int32: the JPEG region to decode, in DCT-scaled pixels
  (all of it for WHOLE); boxes [B, V, 4] int32: each view's crop in that decoded region).
  Non-JPEG rows get full-size boxes; resize_views redraws theirs from the decoded size.
  """
  heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
  boxes = window_from_uniforms(heights[:, None], widths[:, None], uniforms, scales
                               ).astype(np.int64)                           # [B, V, 4]
  top, left = boxes[..., 0].min(1), boxes[..., 1].min(1)
  bottom = (boxes[..., 0] + boxes[..., 2]).max(1)
  right = (boxes[..., 1] + boxes[..., 3]).max(1)
  bottom = np.where(complete, bottom, heights)                    # see the module docstring
  image_area = (heights * widths).astype(np.float64)
  saving = (ROW_SAVING * (heights - bottom) * widths
            + COLUMN_SAVING * (image_area - (heights - bottom) * widths
                               - (bottom - top) * (right - left))) / image_area
  whole = saving <= WINDOW_OVERHEAD
  top, left = np.where(whole, 0, top), np.where(whole, 0, left)
  bottom, right = np.where(whole, heights, bottom), np.where(whole, widths, right)
  # DCT scaling by the largest factor that leaves every view's crop at least `size` a side.
  min_side = boxes[..., 2:].min(axis=(1, 2))
  dct = sum((min_side >= size * r).astype(np.int64) for r in DCT_RATIOS[1:])
  ratio = np.asarray(DCT_RATIOS, np.int64)[dct]

  def up(x, r):                           # libjpeg's scaled side: ceil(side / ratio)
    return -(-x // r)

  y0, x0 = top // ratio, left // ratio
  y1 = np.minimum(up(bottom, ratio), up(heights, ratio))
  x1 = np.minimum(up(right, ratio), up(widths, ratio))
  windows = np.stack([y0, x0, y1 - y0, x1 - x0], -1)
  r, y0, x0, y1, x1 = (a[:, None] for a in (ratio, y0, x0, y1, x1))
  b0, b1 = boxes[..., 0] // r - y0, boxes[..., 1] // r - x0
  b2 = np.minimum(up(boxes[..., 0] + boxes[..., 2], r), y1) - y0 - b0
  b3 = np.minimum(up(boxes[..., 1] + boxes[..., 3], r), x1) - x0 - b1
  jpeg_boxes = np.stack([b0, b1, b2, b3], -1)
  is_jpeg = np.asarray(is_jpeg, bool)
  kinds = np.where(is_jpeg, np.where(whole, WHOLE + dct, dct), OTHER).astype(np.int32)
  return (kinds, np.where(is_jpeg[:, None], windows, 0).astype(np.int32),
          np.where(is_jpeg[:, None, None], jpeg_boxes, boxes).astype(np.int32))


# ---- one decode per record ----------------------------------------------------------------------

def decode_one(encoded: tf.Tensor, kind: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """One record's decode as its kind says: uint8 [h, w, 3] (empty for SKIP). Raises (an
  InvalidArgumentError) on bytes that do not decode, like tf.io.decode_image."""
  branches = [lambda r=r: tf.io.decode_and_crop_jpeg(encoded, window, channels=3, ratio=r)
              for r in DCT_RATIOS]
  branches += [lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r) for r in DCT_RATIOS]
  branches.append(lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
  branches.append(lambda: tf.zeros([0, 0, 3], tf.uint8))
  decoded = tf.switch_case(kind, branches)
  decoded.set_shape([None, None, 3])
  return decoded


def decode_windows(images: tf.Tensor, kinds: tf.Tensor, windows: tf.Tensor) -> list[tf.Tensor]:
  """[B] encoded images (B static), [B] decode kinds, [B, 4] windows -> B decoded windows,
  uint8 [h, w, 3] each.

  One decode op per record in the graph and no other per-record op: no loop, so no loop
  variables and no concatenation that would copy every decoded pixel once more (a while_loop
  with a TensorArray cost ~40 us per record above its decodes). A failing decode fails the
  whole call (the train pipeline then finds the record that failed).
  """
  n = images.shape[0]
  if n is None:
    raise ValueError("decode_windows needs a static number of records.")
  return [decode_one(e, k, w) for e, k, w in
          zip(tf.unstack(images, n), tf.unstack(kinds, n), tf.unstack(windows, n))]


# ---- resize ------------------------------------------------------------------------------------

def resize_crop(crop: np.ndarray, size: int, antialias: bool = False,
                out: np.ndarray | None = None) -> np.ndarray:
  """uint8 [h, w, 3] -> uint8 [size, size, 3]: bilinear with half-pixel centres (OpenCV), or
  PIL's antialiased bilinear (torchvision's filter) if `antialias`. Writes into `out` if given
  (a C-contiguous uint8 [size, size, 3])."""
  if antialias:
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(
        (size, size), Image.BILINEAR))
    if out is None:
      return resized
    out[...] = resized
    return out
  return cv2.resize(crop, (size, size), dst=out, interpolation=cv2.INTER_LINEAR)


def resize_views(decoded: Sequence[np.ndarray], kinds: np.ndarray, boxes: np.ndarray,
                 uniforms: np.ndarray, scales, rows, size: int,
                 antialias_above: float = ANTIALIAS_ABOVE) -> list[np.ndarray]:
  """decode_windows' output (B uint8 [h, w, 3]) -> one uint8 [B, size, size, 3] array per view.

  Only `rows` (indices) are resized; the other rows stay zero. Non-JPEG rows (kind OTHER) get
  their boxes drawn here from the decoded size, with the same uniforms [B, V, 4, ATTEMPTS].
  """
  n, n_views = boxes.shape[:2]
  rows = np.asarray(rows, np.int64)
  # Written once each: the resized rows by the resize, the others zeroed here.
  outs = [np.empty((n, size, size, 3), np.uint8) for _ in range(n_views)]
  unused = np.setdiff1d(np.arange(n), rows)
  for out in outs:
    out[unused] = 0
  boxes = boxes.copy()
  other = rows[kinds[rows] == OTHER]
  if other.size:
    sizes = np.array([decoded[i].shape[:2] for i in other.tolist()], np.int64)
    boxes[other] = window_from_uniforms(sizes[:, 0, None], sizes[:, 1, None], uniforms[other],
                                        scales)
  limit = int(antialias_above * size)
  for i in rows.tolist():
    window = decoded[i]
    for v in range(n_views):
      t, l, bh, bw = boxes[i, v].tolist()
      resize_crop(window[t:t + bh, l:l + bw], size, max(bh, bw) > limit, outs[v][i])
  return outs


# ---- one record, for tests and tools -----------------------------------------------------------

def decode_views(encoded: bytes, uniforms, scales: Sequence[Sequence[float]], size: int,
                 antialias_above: float = ANTIALIAS_ABOVE) -> list[np.ndarray]:
  """Encoded image bytes -> one uint8 [size, size, 3] RandomResizedCrop per view (uniforms
  [V, 4, ATTEMPTS], scales [V, 2]), by the same steps as the train pipeline (run eagerly).
  Raises tf.errors.InvalidArgumentError on bytes that do not decode."""
  encoded = bytes(encoded)
  uniforms = np.asarray(uniforms, np.float64)[None]
  scales = np.asarray(scales, np.float64)
  fmt, height, width = image_lib.header_size(encoded)
  if fmt == "jpeg" and height <= 0:
    raise tf.errors.InvalidArgumentError(None, None, "Unreadable JPEG header.")
  is_jpeg = np.array([fmt == "jpeg"])
  kinds, windows, boxes = plan_decodes([max(height, 1)], [max(width, 1)], is_jpeg,
                                       [encoded.endswith(image_lib.JPEG_END)], uniforms,
                                       scales, size)
  decoded = decode_windows(tf.constant([encoded]), tf.constant(kinds), tf.constant(windows))
  outs = resize_views([d.numpy() for d in decoded], kinds, boxes, uniforms, scales, [0], size,
                      antialias_above)
  return [out[0] for out in outs]
