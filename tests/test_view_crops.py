"""The host half of the image views (data/view_crops.py): torchvision's crop windows, one decode
per record for all its views, the JPEG window / DCT / truncation paths, the PNG path, the resize
against PIL (what torchvision's RandomResizedCrop computes), uint8 output."""

import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

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


def _seeds(n, salt=0):
  return [tf.constant([salt, i], tf.int64) for i in range(n)]


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
def test_windows_match_torchvision_given_the_same_draws(hw, scale):
  rng = np.random.default_rng(hw[0] * 7 + hw[1])
  uniforms = rng.random((64, 4, view_crops.ATTEMPTS)).astype(np.float32)
  got = view_crops.window_from_uniforms(hw[0], hw[1], tf.constant(uniforms),
                                        tf.constant([scale] * 64, tf.float32)).numpy()
  fallbacks = 0
  for u, box in zip(uniforms.astype(np.float64), got):
    want = _torchvision_get_params(hw[0], hw[1], u, scale, RATIO)
    # float32 vs float64 area/sqrt: a box side may round the other way at an exact .5
    np.testing.assert_allclose(box, want, atol=1), (box, want)
    fallbacks += tuple(box) == _torchvision_get_params(hw[0], hw[1], np.full((4, 10), 9.0),
                                                       scale, RATIO)
  if hw == (40, 400):            # 10:1 is outside every allowed ratio: mostly the fallback
    assert fallbacks > 32


def test_window_statistics_follow_scale_and_ratio():
  scale = (0.2, 1.0)
  seeds = [tf.constant([7, i], tf.int64) for i in range(400)]
  boxes = view_crops.crop_windows(480, 640, seeds, [scale] * len(seeds)).numpy()
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
  assert len({tuple(b) for b in boxes}) > 390                       # 400 seeds, distinct boxes
  again = view_crops.crop_windows(480, 640, seeds[:5], [scale] * 5).numpy()
  np.testing.assert_array_equal(again, boxes[:5])                     # stateless


# ---- one decode per record ---------------------------------------------------------------------

def _count_decodes(monkeypatch):
  calls = []
  real_crop, real_image = tf.io.decode_and_crop_jpeg, tf.io.decode_image

  def crop(*args, **kwargs):
    calls.append(("decode_and_crop_jpeg", kwargs.get("ratio", 1)))
    return real_crop(*args, **kwargs)

  def image(*args, **kwargs):
    calls.append(("decode_image", 1))
    return real_image(*args, **kwargs)

  monkeypatch.setattr(tf.io, "decode_and_crop_jpeg", crop)
  monkeypatch.setattr(tf.io, "decode_image", image)
  monkeypatch.setattr(tf.io, "decode_jpeg", lambda *a, **k: calls.append(("decode_jpeg", 1)))
  monkeypatch.setattr(tf.io, "decode_png", lambda *a, **k: calls.append(("decode_png", 1)))
  return calls


def test_every_view_of_a_jpeg_comes_from_one_window_decode(monkeypatch):
  photo = _photo(300, 400)
  jpeg = _encode(photo, quality=95)
  seeds, scales = _seeds(3), [(0.9, 1.0), (0.2, 1.0), (0.2, 1.0)]
  calls = _count_decodes(monkeypatch)       # eager: only the branch taken runs
  views = view_crops.decode_views(tf.constant(jpeg), seeds, scales, 160)   # no DCT scaling
  assert calls == [("decode_and_crop_jpeg", 1)]
  monkeypatch.undo()
  assert [v.shape for v in views] == [(160, 160, 3)] * 3 and views[0].dtype == tf.uint8
  # Each view is its own crop of the SAME decoded union window (reference: decode the union
  # window, cut each box out, resize).
  boxes = view_crops.crop_windows(300, 400, seeds, scales).numpy()
  top, left = boxes[:, 0].min(), boxes[:, 1].min()
  bottom, right = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
  union = tf.io.decode_and_crop_jpeg(jpeg, [top, left, bottom - top, right - left], channels=3)
  for view, (t, l, h, w) in zip(views, boxes):
    crop = union[t - top:t - top + h, l - left:l - left + w]
    shrinks = max(h, w) > view_crops.ANTIALIAS_ABOVE * 160
    np.testing.assert_array_equal(view.numpy(), view_crops.resize_crop(crop, 160, shrinks).numpy())
  # ... and a crop of the photo itself (JPEG at q95 is close), not just any image.
  for view, (t, l, h, w) in zip(views, boxes):
    want = tf.image.resize(photo[t:t + h, l:l + w].astype(np.float32), [160, 160],
                           antialias=True).numpy()
    assert np.abs(view.numpy().astype(np.float32) - want).mean() < 4.0
  assert not np.array_equal(views[1].numpy(), views[2].numpy())


def test_png_takes_one_full_decode_and_the_same_crops_as_its_pixels(monkeypatch):
  photo = _photo(120, 90, seed=3)
  png = _encode(photo, "PNG")
  seeds, scales = _seeds(2, salt=5), [(0.9, 1.0), (0.2, 1.0)]
  calls = _count_decodes(monkeypatch)
  views = view_crops.decode_views(tf.constant(png), seeds, scales, 48)
  assert calls == [("decode_image", 1)]
  monkeypatch.undo()
  boxes = view_crops.crop_windows(120, 90, seeds, scales).numpy()   # same draws, decoded size
  for view, (t, l, h, w) in zip(views, boxes):
    shrinks = max(h, w) > view_crops.ANTIALIAS_ABOVE * 48
    want = view_crops.resize_crop(tf.constant(photo[t:t + h, l:l + w]), 48, shrinks).numpy()
    np.testing.assert_array_equal(view.numpy(), want)                 # lossless: exact
  # BMP takes the same path, bit for bit; a grey JPEG comes out as RGB.
  bmp_views = view_crops.decode_views(tf.constant(_encode(photo, "BMP")), seeds, scales, 48)
  for a, b in zip(views, bmp_views):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  grey = view_crops.decode_views(tf.constant(_encode(photo[..., 0], quality=95)), seeds, scales,
                                 48)[0].numpy()
  assert grey.shape == (48, 48, 3) and (grey[..., 0] == grey[..., 2]).all() and grey.std() > 10
  # The same pixels as a JPEG give (nearly) the same views: the two paths crop alike.
  jpeg_views = view_crops.decode_views(tf.constant(_encode(photo, quality=98)), seeds, scales, 48)
  for a, b in zip(views, jpeg_views):
    assert np.abs(a.numpy().astype(int) - b.numpy()).mean() < 3.0


def test_large_jpeg_is_dct_scaled_and_still_crops_the_same_region(monkeypatch):
  photo = _photo(1024, 1280, seed=4)
  jpeg = _encode(photo, quality=95)
  calls = _count_decodes(monkeypatch)
  view = view_crops.decode_views(tf.constant(jpeg), _seeds(1), [(0.9, 1.0)], 224)[0]
  assert calls == [("decode_and_crop_jpeg", 4)]        # every side >= 4 * 224: scaled by 1/4
  monkeypatch.undo()
  t, l, h, w = view_crops.crop_windows(1024, 1280, _seeds(1), [(0.9, 1.0)]).numpy()[0]
  want = tf.image.resize(photo[t:t + h, l:l + w].astype(np.float32), [224, 224],
                         antialias=True).numpy()
  assert np.abs(view.numpy().astype(np.float32) - want).mean() < 3.0
  # A small second view keeps the decode at full size (its crop must not be enlarged twice).
  calls = _count_decodes(monkeypatch)
  view_crops.decode_views(tf.constant(jpeg), _seeds(2), [(0.9, 1.0), (0.01, 0.02)], 224)
  assert calls == [("decode_and_crop_jpeg", 1)]


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
      view_crops.decode_views(tf.constant(truncated), _seeds(1, salt), [(0.05, 0.1)], 32)
  # Bytes after the marker (some cameras append data) are fine: decoded to the last row.
  padded = view_crops.decode_views(tf.constant(jpeg + b"trailer"), _seeds(1), [(0.05, 0.1)], 32)
  clean = view_crops.decode_views(tf.constant(jpeg), _seeds(1), [(0.05, 0.1)], 32)
  assert np.abs(padded[0].numpy().astype(int) - clean[0].numpy()).max() <= 2
  with pytest.raises(tf.errors.InvalidArgumentError):
    view_crops.decode_views(tf.constant(b"not an image at all"), _seeds(1), [(0.5, 1.0)], 32)


# ---- the resize --------------------------------------------------------------------------------

def test_resize_is_pil_bilinear_where_it_enlarges_or_shrinks_little():
  """torchvision resizes PIL images with PIL's bilinear filter (antialiased when shrinking)."""
  rng = np.random.default_rng(6)
  for h, w, size in [(40, 30, 64), (120, 100, 96), (150, 130, 96), (300, 260, 96)]:
    crop = np.clip(_photo(h, w, seed=h) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    ours = view_crops.resize_crop(tf.constant(crop), size,
                                  max(h, w) > view_crops.ANTIALIAS_ABOVE * size).numpy()
    pil = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
    diff = np.abs(ours.astype(int) - pil)
    assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
    if max(h, w) <= size:        # enlarging: the same filter, up to rounding
      assert diff.max() <= 2 and diff.mean() < 0.6, (h, w, diff.mean())
    else:                        # shrinking by <= 2x without, > 2x with antialiasing: close
      assert diff.mean() < 6, (h, w, diff.mean())
  # uint8 extremes survive (no wrap-around at 255, no negative values at 0).
  edges = np.zeros((20, 20, 3), np.uint8)
  edges[:, 10:] = 255
  out = view_crops.resize_crop(tf.constant(edges), 37).numpy()
  assert out[:, 0].max() == 0 and out[:, -1].min() == 255
  assert 0 < out[0, 18, 0] < 255


def test_antialias_above_one_is_torchvision_filter_on_every_reduction():
  """The demo's setting (config.data.antialias_above=1.0): every shrinking crop antialiased, as
  PIL's bilinear is; the default 2.0 leaves a 1.8x reduction plain bilinear."""
  photo = np.clip(_photo(64, 64, seed=8) + np.random.default_rng(8).normal(0, 25, (64, 64, 3)),
                  0, 255).astype(np.uint8)
  png, seeds = tf.constant(_encode(photo, "PNG")), _seeds(1, salt=9)
  t, l, h, w = view_crops.crop_windows(64, 64, seeds, [(0.8, 1.0)]).numpy()[0]
  pil = np.asarray(Image.fromarray(photo[t:t + h, l:l + w]).resize((32, 32), Image.BILINEAR))
  torchvision_like = view_crops.decode_views(png, seeds, [(0.8, 1.0)], 32, antialias_above=1.0)
  default = view_crops.decode_views(png, seeds, [(0.8, 1.0)], 32)
  near = np.abs(torchvision_like[0].numpy().astype(int) - pil).mean()
  far = np.abs(default[0].numpy().astype(int) - pil).mean()
  assert near < 0.6 and far > 2 * near, (near, far)
