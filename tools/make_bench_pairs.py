"""Writes N photo-like JPEG + caption pairs (and a CSV) for the host-pipeline benchmark.

  python tools/make_bench_pairs.py --out=/tmp/bench_pairs [--count=1024] [--short_side=256]
  python -m xclip_jax.data.convert --csv=/tmp/bench_pairs/pairs.csv --name=bench_pairs \
      --data_dir=/tmp/bench_pairs/tfds
  python -m xclip_jax.data.bench --dataset=bench_pairs --data_dir=/tmp/bench_pairs/tfds \
      --text_key=caption --records=1024 --cores=2

Nothing is downloaded. The images imitate what img2dataset writes for CC3M-style sources
(shorter side 256, the longer one 256-384 either way, JPEG quality 90): smooth colour fields at
several scales, a few hard-edged shapes and sensor-like grain, so their JPEG entropy (and decode
cost) is that of a photo rather than of a flat test pattern. Captions are 6-16 word sentences
with plural, capitalised and inflected words, like alt-text captions. Fixed seed: the same files
every time.
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUBJECTS = ("dogs", "a dog", "two cats", "children", "a woman", "people", "cars", "a man",
            "birds", "horses", "a girl", "students", "tourists", "flowers", "trees", "boats")
VERBS = ("playing", "walking", "running", "standing", "sitting", "waiting", "parked",
         "growing", "gathered", "looking")
PLACES = ("in the snow", "on the beach", "in a park", "along the river", "near the old bridge",
          "in front of the house", "on a city street", "at sunset", "under the trees",
          "in the garden", "on the mountains", "by the lake")
OPENERS = ("", "", "", "Photo of ", "A photo of ", "Image of ", "View of ", "Close up of ")
EXTRAS = ("", "", "on a sunny day", "during the festival", "in winter", "with their friends",
          "at the weekend", "in the background")


def caption(rng: np.random.Generator) -> str:
  words = [OPENERS[rng.integers(len(OPENERS))] + SUBJECTS[rng.integers(len(SUBJECTS))],
           VERBS[rng.integers(len(VERBS))], PLACES[rng.integers(len(PLACES))],
           EXTRAS[rng.integers(len(EXTRAS))]]
  text = " ".join(w for w in words if w)
  return text[0].upper() + text[1:]


def photo(rng: np.random.Generator, short_side: int) -> Image.Image:
  long_side = int(rng.integers(short_side, short_side * 3 // 2 + 1))
  w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
  field = np.zeros((h, w, 3), np.float32)
  for cells, weight in ((2, 90.0), (5, 50.0), (13, 25.0), (40, 12.0)):   # coarse to fine
    grid = rng.normal(size=(cells, cells, 3)).astype(np.float32)
    layer = Image.fromarray(np.uint8(np.clip(grid * 40 + 128, 0, 255))).resize(
        (w, h), Image.BICUBIC)
    field += (np.asarray(layer, np.float32) - 128) * weight / 40
  image = Image.fromarray(np.uint8(np.clip(field + rng.uniform(60, 190, 3), 0, 255)))
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(2, 7))):         # objects with edges
    x0, y0 = rng.integers(0, w), rng.integers(0, h)
    x1, y1 = x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
  image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
  grain = rng.normal(0, rng.uniform(2, 6), (h, w, 1)).astype(np.float32)
  return Image.fromarray(np.uint8(np.clip(np.asarray(image, np.float32) + grain, 0, 255)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--count", type=int, default=1024)
  parser.add_argument("--short_side", type=int, default=256)
  parser.add_argument("--quality", type=int, default=90)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
  rng = np.random.default_rng(args.seed)
  with open(os.path.join(args.out, "pairs.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "caption"])
    for i in range(args.count):
      name = f"images/{i:06d}.jpg"
      photo(rng, args.short_side).save(os.path.join(args.out, name), quality=args.quality)
      writer.writerow([name, caption(rng)])
  print(f"{args.count} pairs in {args.out}/pairs.csv")


if __name__ == "__main__":
  main()
