"""`xclip_demo`: synthetic coloured shapes with varied captions, generated offline.

Each 64x64 RGB image shows one coloured shape (8 shapes x 8 colours) of a random size, position
and rotation on a textured, desaturated background, sometimes with a small grey distractor blob.
Every image carries 3 different captions written from ~20 templates with synonyms for colours and
shapes, free word order and optional mentions of size, position and background, so that a CLIP
model has to read language (not match one fixed string) to solve the contrastive task.

The zero-shot label is the colour x shape combination (64 classes, names like "red circle", using
the canonical word of each synonym set). Shape colours are saturated while backgrounds are not, so
colour never disappears into the background; shapes are chosen to stay distinct under rotation
(no square-vs-diamond) and at the 32px demo resolution.

Nothing is downloaded: a fixed numpy seed per split (and per example index) makes every build
byte-identical, and the test split uses a different seed from the train split (held-out images).
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

IMAGE_SIZE = 64
SUPERSAMPLE = 4              # shapes are drawn at 4x and box-filtered down: smooth, anti-aliased edges
NUM_TRAIN, NUM_TEST = 10_000, 1_000
TRAIN_SEED, TEST_SEED = 20_241, 90_917
CAPTIONS_PER_IMAGE = 3

# Canonical name first; the canonical names build the zero-shot class names.
COLOR_RGB = {
    "red": (220, 30, 35), "orange": (245, 135, 20), "yellow": (240, 220, 30),
    "green": (40, 170, 60), "cyan": (30, 200, 210), "blue": (35, 75, 220),
    "purple": (130, 45, 175), "pink": (245, 105, 180),
}
COLOR_WORDS = {
    "red": ("red", "crimson", "scarlet"), "orange": ("orange", "tangerine", "amber"),
    "yellow": ("yellow", "golden", "lemon"), "green": ("green", "emerald", "lime"),
    "cyan": ("cyan", "turquoise", "aqua", "teal"), "blue": ("blue", "azure", "cobalt", "sapphire"),
    "purple": ("purple", "violet", "plum"), "pink": ("pink", "rose", "fuchsia"),
}
SHAPE_WORDS = {
    "circle": ("circle", "disk", "disc", "dot", "round shape"),
    "square": ("square", "box", "block", "square tile"),
    "triangle": ("triangle", "three-sided shape", "triangular shape"),
    "star": ("star", "five-pointed star", "star shape"),
    "cross": ("cross", "plus sign", "plus shape"),
    "ring": ("ring", "donut", "hoop", "loop"),
    "heart": ("heart", "love heart", "heart shape"),
    "crescent": ("crescent", "crescent moon", "moon shape"),
}
COLORS, SHAPES = tuple(COLOR_RGB), tuple(SHAPE_WORDS)
CLASS_NAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)   # label = color * 8 + shape
SIZES = ("small", "large")
POSITIONS = ("centre", "left", "right", "top", "bottom")
BACKGROUNDS = ("plain", "noisy", "striped", "checkered", "gradient")

SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
POSITION_WORDS = {
    "centre": ("in the centre", "in the middle", "at the center"),
    "left": ("on the left", "at the left side", "to the left"),
    "right": ("on the right", "at the right side", "to the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
}
BACKGROUND_WORDS = {
    "plain": ("plain", "solid", "flat"), "noisy": ("noisy", "grainy", "speckled"),
    "striped": ("striped", "stripy", "lined"), "checkered": ("checkered", "chequered", "checkerboard"),
    "gradient": ("gradient", "shaded", "fading"),
}
# {size}/{pos}/{bg} are optional: each is filled or left empty per caption. {c}=colour, {s}=shape.
TEMPLATES = (
    "a {size}{c} {s}{pos}{bg}", "a photo of a {size}{c} {s}{pos}", "{c} {s}",
    "there is a {size}{c} {s}{pos}", "an image showing a {size}{s} coloured {c}{bg}",
    "a {size}{s} in {c}{pos}", "a {s} that is {c}{pos}{bg}", "the {s} is {c}",
    "a picture with a {c} {s}{pos}", "a drawing of a {size}{c} {s}{bg}", "this is a {c} {s}",
    "a {c} coloured {s}{pos}", "a simple {size}{c} {s} icon{bg}", "a {size}{c} {s} drawn{pos}",
    "{c} {s}{pos}{bg}", "a {size}{s}, painted {c}{pos}", "one {size}{c} {s}{bg}",
    "a rendering of a {c} {s}{pos}", "a {s} of {c} colour{pos}{bg}", "look, a {size}{c} {s}",
)
_BG_PHRASES = (" on a {} background", " against a {} backdrop", " over a {} background")


def _shape_polygon(shape: str, r: float, angle: float) -> np.ndarray:
  """Vertices [n, 2] of a polygonal shape of circumradius r, rotated by angle, centred at 0."""
  if shape == "square":
    t = np.arange(4) * (math.pi / 2) + math.pi / 4
    pts = np.stack([np.cos(t), np.sin(t)], -1) * r
  elif shape == "triangle":
    t = np.arange(3) * (2 * math.pi / 3) - math.pi / 2
    pts = np.stack([np.cos(t), np.sin(t)], -1) * r
  elif shape == "star":
    t = np.arange(10) * (math.pi / 5) - math.pi / 2
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    pts = np.stack([np.cos(t), np.sin(t)], -1) * radii[:, None]
  elif shape == "cross":
    a, b = 0.34 * r, r                      # arm half-width, arm length
    pts = np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                    (-a, a), (-b, a), (-b, -a), (-a, -a)])
  elif shape == "heart":
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) - 2.5
    pts = np.stack([x, y], -1) * (r / 17)
  else:
    raise ValueError(shape)
  rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
  return pts @ rot.T


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
  """Anti-aliased coverage mask float32 [64, 64] in [0, 1]."""
  # Draw only the shape's bounding window (supersampled): 5-10x cheaper than the whole canvas.
  reach = 1.1 * r + 2      # the cross's corners reach 1.06 r
  x0, y0 = max(0, int(cx - reach)), max(0, int(cy - reach))
  x1, y1 = min(IMAGE_SIZE, int(cx + reach) + 1), min(IMAGE_SIZE, int(cy + reach) + 1)
  s = SUPERSAMPLE
  canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
  draw = ImageDraw.Draw(canvas)
  cx, cy, r = (cx - x0) * s, (cy - y0) * s, r * s
  if shape in ("circle", "ring", "crescent"):
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    if shape == "ring":
      ri = 0.55 * r
      draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    elif shape == "crescent":   # bite out an offset disk; the offset direction is the rotation
      ox, oy = cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle)
      ri = 0.78 * r
      draw.ellipse((ox - ri, oy - ri, ox + ri, oy + ri), fill=0)
  else:
    pts = _shape_polygon(shape, r, angle) + np.array([cx, cy])
    draw.polygon([tuple(p) for p in pts], fill=255)
  mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
  window = canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
  mask[y0:y1, x0:x1] = np.asarray(window, np.float32) / 255.0
  return mask


_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
  """Desaturated textured background, float32 [64, 64, 3] in [0, 1]."""
  base = rng.uniform(0.3, 0.75) + rng.uniform(-0.05, 0.05, size=3)   # grey with a faint tint
  yy, xx = _YY, _XX
  if kind == "plain":
    tex = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
  elif kind == "noisy":    # per-pixel, per-channel grain (the only kind that is not PNG-friendly)
    tex = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32) * 0.08
  elif kind == "striped":
    theta, period = rng.uniform(0, math.pi), rng.uniform(6, 14)
    phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period
    tex = np.where((phase % 1.0) < 0.5, 0.09, -0.09)[..., None]
  elif kind == "checkered":
    cell = int(rng.integers(5, 11))
    tex = np.where(((xx // cell + yy // cell) % 2) == 0, 0.09, -0.09)[..., None]
  elif kind == "gradient":
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(theta) + yy * math.sin(theta)) / IMAGE_SIZE
    tex = (0.3 * (ramp - ramp.mean()))[..., None]
  else:
    raise ValueError(kind)
  return np.clip(base.astype(np.float32) + tex, 0, 1).astype(np.float32)


def _centre_for(position: str, r: float, rng: np.random.Generator) -> tuple[float, float]:
  """Shape centre inside the named region, keeping the shape within the image."""
  lo, hi, mid = r + 1, IMAGE_SIZE - r - 1, IMAGE_SIZE / 2
  near = lambda: rng.uniform(mid - 5, mid + 5)               # noqa: E731
  low_side = lambda: rng.uniform(lo, max(lo, mid - 10))      # noqa: E731
  high_side = lambda: rng.uniform(min(hi, mid + 10), hi)     # noqa: E731
  if position == "centre":
    return near(), near()
  if position == "left":
    return low_side(), near()
  if position == "right":
    return high_side(), near()
  if position == "top":
    return near(), low_side()
  return near(), high_side()                                  # bottom


def render_image(color: str, shape: str, size: str, position: str, background: str,
                 rng: np.random.Generator) -> np.ndarray:
  """Draws one example: uint8 [64, 64, 3]."""
  img = _background(background, rng)
  if rng.random() < 0.4:   # a small grey distractor: the model must not key on "any blob"
    grey = rng.uniform(0.15, 0.9)
    dr = rng.uniform(2, 3.5)
    mask = _shape_mask("circle", rng.uniform(4, 60), rng.uniform(4, 60), dr, 0.0)
    img += mask[..., None] * (np.float32(grey) - img)
  r = rng.uniform(7, 10) if size == "small" else rng.uniform(13, 18)
  cx, cy = _centre_for(position, r, rng)
  mask = _shape_mask(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
  rgb = np.clip(np.array(COLOR_RGB[color]) / 255 + rng.uniform(-0.05, 0.05, size=3), 0, 1)
  img += mask[..., None] * (rgb.astype(np.float32) - img)
  return np.round(img * 255).astype(np.uint8)


def make_caption(color: str, shape: str, size: str, position: str, background: str,
                 rng: np.random.Generator) -> str:
  """One caption: a random template, random synonyms, random subset of the optional attributes."""
  pick = lambda words: words[rng.integers(len(words))]   # noqa: E731
  template = pick(TEMPLATES)
  text = template.format(
      c=pick(COLOR_WORDS[color]), s=pick(SHAPE_WORDS[shape]),
      size=pick(SIZE_WORDS[size]) + " " if rng.random() < 0.5 else "",
      pos=" " + pick(POSITION_WORDS[position]) if rng.random() < 0.5 else "",
      bg=pick(_BG_PHRASES).format(pick(BACKGROUND_WORDS[background])) if rng.random() < 0.4 else "")
  return re.sub(r"\ba (?=[aeiou])", "an ", text)   # "a orange" -> "an orange"


def generate_example(split_seed: int, index: int) -> dict:
  """The example at `index` of the split seeded by `split_seed` (independent of other indices)."""
  rng = np.random.default_rng([split_seed, index])
  ci, si = int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))
  size, position, background = (int(rng.integers(len(v))) for v in (SIZES, POSITIONS, BACKGROUNDS))
  attrs = (COLORS[ci], SHAPES[si], SIZES[size], POSITIONS[position], BACKGROUNDS[background])
  image = render_image(*attrs, rng)
  captions: list[str] = []
  for _ in range(50):   # distinct captions; 50 tries is far more than ever needed
    caption = make_caption(*attrs, rng)
    if caption not in captions:
      captions.append(caption)
    if len(captions) == CAPTIONS_PER_IMAGE:
      break
  png = io.BytesIO()
  Image.fromarray(image).save(png, format="PNG", compress_level=1)   # fast; lossless anyway
  return {
      "image": png.getvalue(),
      "captions": {"text": captions},
      "label": ci * len(SHAPES) + si, "color": ci, "shape": si,
      "size": size, "position": position, "background": background,
  }


class XclipDemo(tfds.core.GeneratorBasedBuilder):
  """Synthetic coloured shapes with 3 varied captions each (train 10,000 / test 1,000)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 8 shapes x 8 colours, 64x64 PNG, 3 captions."}

  def _info(self) -> tfds.core.DatasetInfo:
    label = tfds.features.ClassLabel
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
            "label": label(names=CLASS_NAMES),
            "color": label(names=COLORS),
            "shape": label(names=SHAPES),
            "size": label(names=SIZES),
            "position": label(names=POSITIONS),
            "background": label(names=BACKGROUNDS),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated locally
    return {
        "train": self._generate_examples(TRAIN_SEED, NUM_TRAIN),
        "test": self._generate_examples(TEST_SEED, NUM_TEST),
    }

  def _generate_examples(self, split_seed: int, num_examples: int):
    for index in range(num_examples):
      yield index, generate_example(split_seed, index)
