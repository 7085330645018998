"""Cleaning one image-text pair for conversion: every image comes out as an RGB JPEG that TF
decodes, every caption as non-empty UTF-8 of bounded length, or the pair is skipped with a reason.

Reasons a pair is SKIPPED (keys of the converter's summary "skipped"):
  undecodable_image   empty, corrupt or truncated bytes, or a format Pillow cannot read
  too_small           shorter side below `min_side`, before or after resizing to `max_side`
                      (1x1 tracking pixels, thumbnails, 10,000 x 90 banners)
  too_large           more than `max_pixels` pixels (decompression bombs, 10,000-px scans)
  empty_caption       nothing left after whitespace normalisation
(the readers add missing_image, missing_caption, unsafe_tar_entry, ... see pair_sources.py)

What is CONVERTED and counted (keys of "converted"):
  cmyk_to_rgb, grayscale_to_rgb, alpha_composited (onto white), other_mode_to_rgb,
  exif_rotated, resized (longer side > max_side), reencoded (not a plain RGB JPEG),
  caption_utf8_repaired (invalid bytes -> U+FFFD), caption_truncated (> max_caption_chars).

Pure Pillow and the standard library: runs in converter worker processes.
"""

from __future__ import annotations

import dataclasses
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

SKIP_REASONS = ("undecodable_image", "too_small", "too_large", "empty_caption")


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  max_side: int = 0                 # resize so the longer side is at most this (0: keep the size)
  min_side: int = 16                # skip images whose shorter side is below this
  max_pixels: int = 89_478_485      # skip above this many pixels (Pillow's bomb threshold)
  quality: int = 95                 # JPEG quality of re-encoded images


@dataclasses.dataclass
class Cleaned:
  """`value` (JPEG bytes or caption str) or a skip `reason`; `fixes` lists what was converted."""
  value: bytes | str | None
  reason: str | None = None
  fixes: tuple[str, ...] = ()


_WHITESPACE = re.compile(r"\s+")


def clean_caption(raw: bytes | str | None, max_chars: int = 1000) -> Cleaned:
  """UTF-8 (repairing invalid bytes), NULs and runs of whitespace collapsed, cut at `max_chars`
  (at a word boundary when there is one in the last fifth)."""
  if raw is None:
    return Cleaned(None, "empty_caption")
  fixes = []
  if isinstance(raw, bytes):
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      text = raw.decode("utf-8", errors="replace")
      fixes.append("caption_utf8_repaired")
  else:   # text read with surrogateescape (CSV): lone surrogates are the invalid bytes
    try:
      raw.encode("utf-8")
      text = raw
    except UnicodeEncodeError:
      text = raw.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")
      fixes.append("caption_utf8_repaired")
  text = _WHITESPACE.sub(" ", text.replace("\x00", " ")).strip()
  if not text:
    return Cleaned(None, "empty_caption", tuple(fixes))
  if max_chars and len(text) > max_chars:
    cut = text[:max_chars]
    space = cut.rfind(" ")
    text = (cut[:space] if space > 0.8 * max_chars else cut).rstrip()
    fixes.append("caption_truncated")
  return Cleaned(text, None, tuple(fixes))


def _to_rgb(image: Image.Image, fixes: list[str]) -> Image.Image:
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info) or (
      mode in ("L", "RGB") and "transparency" in image.info):
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    fixes.append("alpha_composited")
    return Image.alpha_composite(white, rgba).convert("RGB")
  if mode == "CMYK":
    fixes.append("cmyk_to_rgb")
    return image.convert("RGB")
  if mode in ("I;16", "I;16B", "I;16L", "I", "F"):   # high bit depth grey: scale to 8 bits
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    fixes.append("grayscale_to_rgb")
    return Image.fromarray(grey, "L").convert("RGB")
  if mode in ("L", "1"):
    fixes.append("grayscale_to_rgb")
    return image.convert("RGB")
  fixes.append("other_mode_to_rgb")   # P without transparency, YCbCr, LAB, HSV, ...
  return image.convert("RGB")


def clean_image(data: bytes | None, options: ImageOptions = ImageOptions()) -> Cleaned:
  """Encoded image bytes -> RGB JPEG bytes (the original bytes when already a fitting RGB JPEG)."""
  if not data:
    return Cleaned(None, "undecodable_image")
  fixes: list[str] = []
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")      # DecompressionBombWarning, EXIF/ICC chatter
      image = Image.open(io.BytesIO(data))
      width, height = image.size           # header only: nothing decoded yet
      if width * height > options.max_pixels:
        return Cleaned(None, "too_large")
      if min(width, height) < options.min_side:
        return Cleaned(None, "too_small")
      source_format, source_mode = image.format, image.mode
      if options.max_side and max(width, height) > options.max_side and source_format == "JPEG":
        image.draft("RGB", (options.max_side, options.max_side))   # decode at a reduced scale
      image.load()                                                 # truncation shows up here
      drafted = image.size != (width, height)
      if _has_rotation(image):
        fixes.append("exif_rotated")
        image = ImageOps.exif_transpose(image)
      image = _to_rgb(image, fixes)
  except Image.DecompressionBombError:
    return Cleaned(None, "too_large")
  except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError, EOFError,
          MemoryError, ZeroDivisionError, IndexError, TypeError, KeyError):
    return Cleaned(None, "undecodable_image")
  if options.max_side and max(image.size) > options.max_side:
    scale = options.max_side / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    if min(size) < options.min_side:   # a 10,000 x 90 banner would become 64 x 1
      return Cleaned(None, "too_small")
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    fixes.append("resized")
  elif drafted:   # draft() already shrank a JPEG to within max_side
    fixes.append("resized")
  if not fixes and source_format == "JPEG" and source_mode == "RGB":
    return Cleaned(data)                # already what the pipeline wants: no generation loss
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=options.quality)
  if "resized" not in fixes and not any(f.endswith("_to_rgb") or f == "alpha_composited"
                                        for f in fixes):
    fixes.append("reencoded")
  return Cleaned(out.getvalue(), None, tuple(fixes))


def _has_rotation(image: Image.Image) -> bool:
  """True when EXIF asks for any transform but the identity (exif_transpose then applied it)."""
  try:
    return image.getexif().get(0x0112, 1) not in (1, None)
  except Exception:  # noqa: BLE001  (unreadable EXIF is not a reason to drop a decodable image)
    return False
