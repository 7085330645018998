"""The host half of the image views (data/view_crops.py, image.py's header readers):
torchvision's crop windows, the JPEG/PNG header sizes against TF's, one decode per record for all
its views, the JPEG window / DCT / truncation paths, the PNG path, the resize against PIL (what
torchvision's RandomResizedCrop computes) and TF's bilinear, uint8 output."""

import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from xclip_jax.data import image as image_lib
from xclip_jax.data import view_crops

RATIO = (3 / 4, 4 / 3)


def _photo(h, w, seed=0):
  """Smooth colour field + detail: JPEG keeps it close, crops of it differ."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  base = np.stack([128 + 100 * np.sin(6 * x + 3 * y), 128 + 100 * np.cos(5 * y),
                   128 + 90 * np.sin(4 * (x - y))], -1)
  return np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def _encode(array, fmt="JPEG", **kw):
  out = io.BytesIO()
  Image.fromarray(array).save(out, format=fmt, **kw)
  return out.getvalue()


def _uniforms(n, salt=0):
  """Per view, the 4 x ATTEMPTS uniforms of its window (24-bit, as the pipeline's)."""
  bits = np.random.default_rng(salt).integers(0, 2**24, (n, 4, view_crops.ATTEMPTS))
  return bits * 2.0**-24


# ---- crop windows: torchvision's RandomResizedCrop.get_params ------------------------------------

def _torchvision_get_params(height, width, u, scale, ratio):
  """torchvision.transforms.RandomResizedCrop.get_params, transcribed, with its random draws
  replaced by the given uniforms u[0..3][attempt] (area, log-ratio, top, left)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for attempt in range(10):
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0][attempt])
    aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1][attempt])
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = int(u[2][attempt] * (height - h + 1))          # torch.randint(0, height - h + 1)
      j = int(u[3][attempt] * (width - w + 1))
      return i, j, h, w
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("hw,scale", [((256, 384), (0.08, 1.0)), ((300, 200), (0.9, 1.0)),
                                      ((40, 400), (0.5, 1.0)), ((256, 256), (0.2, 1.0))])
def test_windows_are_torchvision_given_the_same_draws(hw, scale):
  uniforms = _uniforms(256, salt=hw[0] * 7 + hw[1])
  got = view_crops.window_from_uniforms(hw[0], hw[1], uniforms, [scale] * 256)
  fallbacks = 0
  for u, box in zip(uniforms, got):
    want = _torchvision_get_params(hw[0], hw[1], u, scale, RATIO)
    assert tuple(box) == want                       # float64 arithmetic, as torchvision's
    fallbacks += want == _torchvision_get_params(hw[0], hw[1], np.full((4, 10), 9.0), scale,
                                                  RATIO)
  if hw == (40, 400):            # 10:1 is outside every allowed ratio: mostly the fallback
    assert fallbacks > 128
  # Leading axes: several images and views at once, broadcast like the pipeline's [B, V].
  sizes = np.array([[256], [300], [40]]), np.array([[384], [200], [400]])
  many = view_crops.window_from_uniforms(*sizes, uniforms[:6].reshape(3, 2, 4, 10),
                                         [(0.08, 1.0), (0.9, 1.0)])
  for b in range(3):
    for v, s in enumerate([(0.08, 1.0), (0.9, 1.0)]):
      want = _torchvision_get_params(int(sizes[0][b, 0]), int(sizes[1][b, 0]),
                                     uniforms[2 * b + v], s, RATIO)
      assert tuple(many[b, v]) == want


def test_window_statistics_follow_scale_and_ratio():
  scale = (0.2, 1.0)
  boxes = view_crops.window_from_uniforms(480, 640, _uniforms(400, salt=7), [scale] * 400)
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 480).all() and (left + w <= 640).all()
  area = h * w / (480 * 640)
  aspect = w / h
  # Rounding a side to whole pixels moves the area and ratio by well under 2%.
  assert area.min() >= scale[0] * 0.98 and area.max() <= scale[1] * 1.0
  assert aspect.min() >= RATIO[0] * 0.98 and aspect.max() <= RATIO[1] * 1.02
  # The distribution is torchvision's: compare with its algorithm on independent numpy draws
  # (rejected attempts make large areas rarer than uniform: the mean is below 0.6).
  rng = np.random.default_rng(0)
  ref = np.array([_torchvision_get_params(480, 640, rng.random((4, 10)), scale, RATIO)
                  for _ in range(4000)])
  ref_area, ref_aspect = ref[:, 2] * ref[:, 3] / (480 * 640), ref[:, 3] / ref[:, 2]
  assert abs(area.mean() - ref_area.mean()) < 0.04 and abs(area.std() - ref_area.std()) < 0.03
  assert abs(np.log(aspect).mean() - np.log(ref_aspect).mean()) < 0.03
  assert area.min() < 0.25 and area.max() > 0.9 and aspect.min() < 0.8 and aspect.max() > 1.25
  assert top.min() < 10 and left.min() < 10 and (top + h).max() > 470 and (left + w).max() > 630
  assert len({tuple(b) for b in boxes}) > 390                     # 400 draws, distinct boxes


# ---- header sizes ------------------------------------------------------------------------------

def _segments_after_app0(jpeg):
  return 4 + int.from_bytes(jpeg[4:6], "big")


def test_jpeg_header_size_is_libjpegs():
  photo = _photo(50, 70, seed=1)
  plain = _encode(photo, quality=90)
  cut = _segments_after_app0(plain)
  thumbnail = _encode(_photo(8, 12), quality=50)          # a JPEG inside APP1, with its own SOF
  app1 = b"\xff\xe1" + (len(thumbnail) + 8).to_bytes(2, "big") + b"Exif\0\0" + thumbnail
  variants = {
      "baseline": plain,
      "progressive": _encode(photo, quality=90, progressive=True),
      "grey": _encode(photo[..., 0], quality=90),
      "cmyk": _encode_cmyk(photo),
      "exif thumbnail": plain[:cut] + app1 + plain[cut:],
      "stray bytes": plain[:cut] + b"\x00\x12\x34" + plain[cut:],     # libjpeg: a warning
      "fill bytes": plain[:cut] + b"\xff\xff\xff" + plain[cut:],
      "bytes after EOI": plain + b"trailer",
  }
  for name, data in variants.items():
    want = tuple(tf.io.extract_jpeg_shape(data).numpy()[:2])
    assert image_lib.header_size(data) == ("jpeg", *want), name
  assert image_lib.header_size(_encode(_photo(31, 17), "PNG")) == ("png", 31, 17)
  for name, data in {"cut in the header": plain[:cut + 10], "no frame header": plain[:cut],
                     "SOI twice": plain[:2] + plain}.items():
    assert image_lib.jpeg_size(data) == (-1, -1), name
    with pytest.raises(tf.errors.InvalidArgumentError):
      tf.io.decode_jpeg(data)
  for data in (b"", b"<html>not found</html>", _encode(photo, "GIF"), _encode(photo, "BMP")):
    assert image_lib.header_size(data) == ("other", -1, -1)
  assert image_lib.is_complete(plain, "jpeg") and image_lib.is_complete(
      _encode(photo, "PNG"), "png")
  assert not image_lib.is_complete(plain[:-5], "jpeg")
  assert not image_lib.is_complete(plain + b"trailer", "jpeg")
  assert not image_lib.is_complete(_encode(photo, "PNG")[:-20], "png")


def _encode_cmyk(array):
  out = io.BytesIO()
  Image.fromarray(array).convert("CMYK").save(out, format="JPEG", quality=90)
  return out.getvalue()


# ---- one decode per record ---------------------------------------------------------------------

def _count_decodes(monkeypatch):
  calls = []
  real_crop, real_image, real_jpeg = (tf.io.decode_and_crop_jpeg, tf.io.decode_image,
                                      tf.io.decode_jpeg)

  def crop(*args, **kwargs):
    calls.append(("decode_and_crop_jpeg", kwargs.get("ratio", 1)))
    return real_crop(*args, **kwargs)

  def image(*args, **kwargs):
    calls.append(("decode_image", 1))
    return real_image(*args, **kwargs)

  def jpeg(*args, **kwargs):
    calls.append(("decode_jpeg", kwargs.get("ratio", 1)))
    return real_jpeg(*args, **kwargs)

  monkeypatch.setattr(tf.io, "decode_and_crop_jpeg", crop)
  monkeypatch.setattr(tf.io, "decode_image", image)
  monkeypatch.setattr(tf.io, "decode_jpeg", jpeg)
  monkeypatch.setattr(tf.io, "decode_png", lambda *a, **k: calls.append(("decode_png", 1)))
  return calls


@pytest.mark.parametrize("decode", ["window", "whole"])
def test_every_view_of_a_jpeg_comes_from_one_decode(monkeypatch, decode):
  photo = _photo(300, 400)
  jpeg = _encode(photo, quality=95)
  uniforms, scales = _uniforms(3), [(0.9, 1.0), (0.2, 1.0), (0.2, 1.0)]
  # The union of these crops covers most of the photo: the cost rule decodes it whole; an
  # overhead below any saving forces the window decode.
  overhead = {"window": -1.0, "whole": view_crops.WINDOW_OVERHEAD}[decode]
  monkeypatch.setattr(view_crops, "WINDOW_OVERHEAD", overhead)
  calls = _count_decodes(monkeypatch)       # eager: only the branch taken runs
  views = view_crops.decode_views(jpeg, uniforms, scales, 160)   # no DCT scaling
  assert calls == [{"window": ("decode_and_crop_jpeg", 1), "whole": ("decode_jpeg", 1)}[decode]]
  monkeypatch.undo()
  assert [v.shape for v in views] == [(160, 160, 3)] * 3 and views[0].dtype == np.uint8
  # Each view is its own crop of the SAME decoded region (reference: decode the union window,
  # or the whole image, cut each box out, resize).
  boxes = view_crops.window_from_uniforms(300, 400, uniforms, scales)
  top, left = boxes[:, 0].min(), boxes[:, 1].min()
  bottom, right = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
  if decode == "window":
    union = tf.io.decode_and_crop_jpeg(jpeg, [top, left, bottom - top, right - left],
                                       channels=3).numpy()
  else:
    top = left = 0
    union = tf.io.decode_jpeg(jpeg, channels=3).numpy()
  for view, (t, l, h, w) in zip(views, boxes):
    crop = union[t - top:t - top + h, l - left:l - left + w]
    shrinks = max(h, w) > view_crops.ANTIALIAS_ABOVE * 160
    np.testing.assert_array_equal(view, view_crops.resize_crop(crop, 160, shrinks))
  # ... and a crop of the photo itself (JPEG at q95 is close), not just any image.
  for view, (t, l, h, w) in zip(views, boxes):
    want = tf.image.resize(photo[t:t + h, l:l + w].astype(np.float32), [160, 160],
                           antialias=True).numpy()
    assert np.abs(view.astype(np.float32) - want).mean() < 4.0
  assert not np.array_equal(views[1], views[2])


def test_png_takes_one_full_decode_and_the_same_crops_as_its_pixels(monkeypatch):
  photo = _photo(120, 90, seed=3)
  png = _encode(photo, "PNG")
  uniforms, scales = _uniforms(2, salt=5), [(0.9, 1.0), (0.2, 1.0)]
  calls = _count_decodes(monkeypatch)
  views = view_crops.decode_views(png, uniforms, scales, 48)
  assert calls == [("decode_image", 1)]
  monkeypatch.undo()
  boxes = view_crops.window_from_uniforms(120, 90, uniforms, scales)   # the decoded size
  for view, (t, l, h, w) in zip(views, boxes):
    shrinks = max(h, w) > view_crops.ANTIALIAS_ABOVE * 48
    want = view_crops.resize_crop(photo[t:t + h, l:l + w], 48, shrinks)
    np.testing.assert_array_equal(view, want)                          # lossless: exact
  # BMP takes the same path, bit for bit; a grey JPEG comes out as RGB.
  bmp_views = view_crops.decode_views(_encode(photo, "BMP"), uniforms, scales, 48)
  for a, b in zip(views, bmp_views):
    np.testing.assert_array_equal(a, b)
  grey = view_crops.decode_views(_encode(photo[..., 0], quality=95), uniforms, scales, 48)[0]
  assert grey.shape == (48, 48, 3) and (grey[..., 0] == grey[..., 2]).all() and grey.std() > 10
  # The same pixels as a JPEG give (nearly) the same views: the two paths crop alike.
  jpeg_views = view_crops.decode_views(_encode(photo, quality=98), uniforms, scales, 48)
  for a, b in zip(views, jpeg_views):
    assert np.abs(a.astype(int) - b).mean() < 3.0


def test_large_jpeg_is_dct_scaled_and_still_crops_the_same_region(monkeypatch):
  photo = _photo(1024, 1280, seed=4)
  jpeg = _encode(photo, quality=95)
  calls = _count_decodes(monkeypatch)
  view = view_crops.decode_views(jpeg, _uniforms(1), [(0.9, 1.0)], 224)[0]
  assert calls == [("decode_jpeg", 4)]        # every side >= 4 * 224: scaled by 1/4, all of it
  monkeypatch.undo()
  t, l, h, w = view_crops.window_from_uniforms(1024, 1280, _uniforms(1), [(0.9, 1.0)])[0]
  want = tf.image.resize(photo[t:t + h, l:l + w].astype(np.float32), [224, 224],
                         antialias=True).numpy()
  assert np.abs(view.astype(np.float32) - want).mean() < 3.0
  # A small second view keeps the decode at full size (its crop must not be enlarged twice).
  calls = _count_decodes(monkeypatch)
  view_crops.decode_views(jpeg, _uniforms(2), [(0.9, 1.0), (0.01, 0.02)], 224)
  assert len(calls) == 1 and calls[0][1] == 1


def test_a_window_is_decoded_only_where_it_saves_more_than_its_overhead():
  # 400 x 300 JPEG, one view, output 224 px (no DCT scaling: kinds 0 / WHOLE).
  def kind_of(box):
    uniforms = np.zeros((1, 1, 4, view_crops.ATTEMPTS))
    t, l, h, w = box       # uniforms that draw exactly this box: area, aspect, top, left
    uniforms[0, 0, 0] = h * w / (400 * 300)
    uniforms[0, 0, 1] = (np.log(w / h) - np.log(3 / 4)) / (np.log(4 / 3) - np.log(3 / 4))
    uniforms[0, 0, 2] = (t + 0.5) / (400 - h + 1)
    uniforms[0, 0, 3] = (l + 0.5) / (300 - w + 1)
    kinds, windows, boxes = view_crops.plan_decodes([400], [300], [True], [True], uniforms,
                                                    [(0.0, 1.0)], 224)
    return int(kinds[0]), windows[0].tolist(), boxes[0, 0].tolist()
  # The top 40%: rows below the window save 0.8 * 0.6 = 0.48 of a whole decode > 0.1.
  assert kind_of((0, 0, 160, 160)) == (0, [0, 0, 160, 160], [0, 0, 160, 160])
  # Down to the last row and 80% of the columns: saves 0.2 * 0.2 = 0.04 <= 0.1: whole.
  assert kind_of((80, 60, 320, 240)) == (view_crops.WHOLE, [0, 0, 400, 300], [80, 60, 320, 240])
  # Down to the last row, 60% of the area: saves 0.2 * 0.4 = 0.08: whole.
  assert kind_of((100, 40, 300, 240))[0] == view_crops.WHOLE
  # A quarter at the top left: 0.8 * 0.5 + 0.2 * 0.25 = 0.45: the window.
  assert kind_of((0, 0, 200, 150))[0] == 0
  # A truncated file is decoded to its last row (see the truncated-JPEG test): a narrow crop at
  # the top becomes a full-height strip, which saves only 0.2 of the columns beside it.
  uniforms = np.full((1, 1, 4, view_crops.ATTEMPTS), 0.01)
  for complete, want in ((True, 0), (False, 0)):
    kinds, windows, _ = view_crops.plan_decodes([400], [300], [True], [complete], uniforms,
                                                [(0.0, 0.1)], 224)
    assert kinds[0] == want and (windows[0, 0] + windows[0, 2] == 400) == (not complete)
  kinds, windows, _ = view_crops.plan_decodes([400], [300], [True], [False], uniforms,
                                              [(0.5, 0.6)], 224)
  assert kinds[0] == view_crops.WHOLE and windows[0].tolist() == [0, 0, 400, 300]


def test_a_truncated_jpeg_fails_even_when_the_crop_lies_above_the_damage():
  photo = _photo(400, 300, seed=5)
  jpeg = _encode(photo, quality=90)
  truncated = jpeg[: int(len(jpeg) * 0.7)]
  # A window in the top rows decodes from the truncated bytes (libjpeg stops early) ...
  assert tf.io.decode_and_crop_jpeg(truncated, [0, 0, 60, 60], channels=3).shape == (60, 60, 3)
  # ... but without its end-of-image marker the record is decoded to its last row: it fails,
  # as a full decode does, whichever crop was drawn.
  with pytest.raises(tf.errors.InvalidArgumentError):
    tf.io.decode_jpeg(truncated, channels=3)
  for salt in range(4):
    with pytest.raises(tf.errors.InvalidArgumentError):
      view_crops.decode_views(truncated, _uniforms(1, salt), [(0.05, 0.1)], 32)
  # Bytes after the marker (some cameras append data) are fine: decoded to the last row.
  padded = view_crops.decode_views(jpeg + b"trailer", _uniforms(1), [(0.05, 0.1)], 32)
  clean = view_crops.decode_views(jpeg, _uniforms(1), [(0.05, 0.1)], 32)
  assert np.abs(padded[0].astype(int) - clean[0]).max() <= 2
  for garbage in (b"not an image at all", jpeg[:40]):
    with pytest.raises(tf.errors.InvalidArgumentError):
      view_crops.decode_views(garbage, _uniforms(1), [(0.5, 1.0)], 32)


# ---- the resize --------------------------------------------------------------------------------

def _noisy(h, w, seed):
  rng = np.random.default_rng(seed)
  return np.clip(_photo(h, w, seed=h) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def test_bilinear_resize_is_tfs_exact_filter_within_one_level():
  """The plain path (OpenCV's INTER_LINEAR, fixed-point weights) against TF's float bilinear
  with half-pixel centres, an independent implementation of the same filter, rounded."""
  for h, w, size in [(40, 30, 64), (224, 224, 224), (300, 250, 224), (97, 203, 64), (5, 7, 32),
                     (448, 448, 224), (150, 130, 96)]:
    crop = _noisy(h, w, seed=h + w)
    ours = view_crops.resize_crop(crop, size)
    exact = tf.image.resize(crop.astype(np.float32), [size, size]).numpy()
    diff = np.abs(ours.astype(np.float64) - exact)
    assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
    assert diff.max() <= 1.0, (h, w, diff.max())
    assert diff.mean() < 0.3, (h, w, diff.mean())
    # Written in place into a batch's row, as the pipeline does.
    out = np.zeros((2, size, size, 3), np.uint8)
    view_crops.resize_crop(crop[1:, 1:], size, out=out[1])
    np.testing.assert_array_equal(out[1], view_crops.resize_crop(crop[1:, 1:].copy(), size))
    assert not out[0].any()


def test_resize_is_pil_bilinear_where_it_enlarges_and_pil_exactly_where_antialiased():
  """torchvision resizes PIL images with PIL's bilinear filter (antialiased when shrinking)."""
  for h, w, size in [(40, 30, 64), (120, 100, 96), (150, 130, 96), (300, 260, 96)]:
    crop = _noisy(h, w, seed=6)
    antialias = max(h, w) > view_crops.ANTIALIAS_ABOVE * size
    ours = view_crops.resize_crop(crop, size, antialias)
    pil = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
    diff = np.abs(ours.astype(int) - pil)
    if max(h, w) <= size:        # enlarging: the same filter, up to rounding
      assert diff.max() <= 2 and diff.mean() < 0.6, (h, w, diff.mean())
    elif antialias:              # shrinking by > 2x: PIL itself, bit for bit
      np.testing.assert_array_equal(ours, pil)
    else:                        # shrinking by <= 2x without antialiasing: close
      assert diff.mean() < 6, (h, w, diff.mean())
  # uint8 extremes survive (no wrap-around at 255, no negative values at 0).
  edges = np.zeros((20, 20, 3), np.uint8)
  edges[:, 10:] = 255
  out = view_crops.resize_crop(edges, 37)
  assert out[:, 0].max() == 0 and out[:, -1].min() == 255
  assert 0 < out[0, 18, 0] < 255


def test_antialias_above_one_is_torchvision_filter_on_every_reduction():
  """The demo's setting (config.data.antialias_above=1.0): every shrinking crop antialiased, as
  PIL's bilinear is; the default 2.0 leaves a 1.8x reduction plain bilinear."""
  photo = np.clip(_photo(64, 64, seed=8) + np.random.default_rng(8).normal(0, 25, (64, 64, 3)),
                  0, 255).astype(np.uint8)
  png, uniforms = _encode(photo, "PNG"), _uniforms(1, salt=9)
  t, l, h, w = view_crops.window_from_uniforms(64, 64, uniforms, [(0.8, 1.0)])[0]
  pil = np.asarray(Image.fromarray(photo[t:t + h, l:l + w]).resize((32, 32), Image.BILINEAR))
  torchvision_like = view_crops.decode_views(png, uniforms, [(0.8, 1.0)], 32, antialias_above=1.0)
  default = view_crops.decode_views(png, uniforms, [(0.8, 1.0)], 32)
  np.testing.assert_array_equal(torchvision_like[0], pil)
  assert np.abs(default[0].astype(int) - pil).mean() > 2
