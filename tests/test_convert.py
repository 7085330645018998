"""The converter (xclip_jax.data.convert): tar shards and CSVs full of deliberately bad records ->
a TFDS dataset; exact counts by reason, unsafe tar paths, resume, the CLI, train + tokenizer on it.
"""

import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from xclip_jax import config as cfglib
from xclip_jax.data import convert
from xclip_jax.data import datasets
from xclip_jax.data import global_batches
from xclip_jax.data import tokenizer as toklib
from xclip_jax.data import train_pipeline
from xclip_jax.data import views as views_lib
from xclip_jax.data.pairs import pair_cleaning
from xclip_jax.data.pairs import pair_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = convert.Options(image=pair_cleaning.ImageOptions(max_side=64, min_side=8,
                                                           max_pixels=1_000_000),
                          max_caption_chars=200)


def encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
  out = io.BytesIO()
  image.save(out, format=fmt, **kw)
  return out.getvalue()


def photo(w=48, h=40, seed=0) -> Image.Image:
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
  return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def add(archive: tarfile.TarFile, name: str, data: bytes, kind=tarfile.REGTYPE, link=""):
  info = tarfile.TarInfo(name)
  info.type, info.linkname = kind, link
  info.size = len(data) if kind == tarfile.REGTYPE else 0
  archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def bad_tar(path: str) -> dict:
  """A shard with every kind of bad record; returns the expected summary counts."""
  good = encode(photo())
  with tarfile.open(path, "w") as t:
    add(t, "000000.jpg", good)
    add(t, "000000.txt", b"a plain good photo")
    add(t, "000000.json", b'{"caption": "ignored: txt wins"}')
    add(t, "000001.png", encode(photo(seed=1).convert("RGBA"), "PNG"))      # alpha
    add(t, "000001.txt", b"with alpha")
    add(t, "000002.png", encode(photo(seed=2).convert("L"), "PNG"))         # grayscale
    add(t, "000002.txt", b"grey")
    add(t, "000003.jpg", encode(photo(seed=3).convert("CMYK"), "JPEG"))     # CMYK
    add(t, "000003.txt", b"cmyk")
    add(t, "000004.webp", encode(photo(seed=4), "WEBP"))                    # re-encoded
    add(t, "000004.json", b'{"caption": "caption only in the json"}')
    add(t, "000005.jpg", good[: len(good) // 2])                            # truncated
    add(t, "000005.txt", b"truncated image")
    add(t, "000006.jpg", b"definitely not an image")                        # corrupt
    add(t, "000006.txt", b"corrupt image")
    add(t, "000007.png", encode(Image.new("RGB", (1, 1)), "PNG"))           # 1x1
    add(t, "000007.txt", b"tracking pixel")
    add(t, "000008.png", encode(Image.new("RGB", (10_000, 200)), "PNG"))    # 2M pixels
    add(t, "000008.txt", b"10,000 pixels wide")
    add(t, "000009.png", encode(photo(1000, 500, seed=9), "PNG"))           # resized to 64x32
    add(t, "000009.txt", b"large but allowed")
    add(t, "000016.png", encode(Image.new("RGB", (10_000, 90)), "PNG"))     # 64x1 once resized
    add(t, "000016.txt", b"a banner")
    add(t, "000010.jpg", good)
    add(t, "000010.txt", b"   \n\t ")                                        # empty caption
    add(t, "000011.jpg", good)
    add(t, "000011.txt", b"caf\xe9 cr\xe8me")                                # latin-1, not UTF-8
    add(t, "000012.jpg", good)
    add(t, "000012.txt", ("word " * 2000).encode())                          # far too long
    add(t, "000013.jpg", good)                                               # no caption
    add(t, "000014.txt", b"no image")                                        # no image
    add(t, "../evil.txt", b"escape")                                         # unsafe entries
    add(t, "/abs/evil.jpg", good)
    add(t, "sub/../../evil2.jpg", good)
    add(t, "link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd")
    add(t, "hard.jpg", b"", tarfile.LNKTYPE, "000000.jpg")
    add(t, "dev.jpg", b"", tarfile.CHRTYPE)
    add(t, "000015.jpg", good)
    add(t, "000015.txt", b"the last good one")
  return {"written": 9,
          "skipped": {"empty_caption": 1, "missing_caption": 1, "missing_image": 1,
                      "too_large": 1, "too_small": 2, "undecodable_image": 2,
                      "unsafe_tar_entry": 6},
          "converted": {"alpha_composited": 1, "caption_truncated": 1,
                        "caption_utf8_repaired": 1, "cmyk_to_rgb": 1, "grayscale_to_rgb": 1,
                        "reencoded": 1, "resized": 1}}


def good_tar(path: str, n: int, seed: int) -> None:
  with tarfile.open(path, "w") as t:
    for i in range(n):
      add(t, f"{seed:02d}{i:04d}.jpg", encode(photo(seed=seed * 100 + i)))
      add(t, f"{seed:02d}{i:04d}.txt", f"photo {i} of shard {seed}: a red cat".encode())


def read_all(data_dir, name):
  builder = tfds.builder(name, data_dir=data_dir)
  ds = builder.as_dataset(split="train", shuffle_files=False)
  return builder, list(ds.as_numpy_iterator())


def test_tar_bad_records_exact_counts(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  expected = bad_tar(str(src / "00000.tar"))
  data_dir = str(tmp_path / "tfds")
  tasks = convert.plan_tasks(str(src / "*.tar"), options=OPTIONS)
  summary = convert.convert(tasks, name="bad_pairs", data_dir=data_dir, options=OPTIONS,
                            progress=False)
  assert {k: summary[k] for k in expected} == expected
  assert summary["skipped_total"] == sum(expected["skipped"].values())

  builder, examples = read_all(data_dir, "bad_pairs")
  assert builder.info.splits["train"].num_examples == 9
  captions = [e["caption"].decode() for e in examples]
  assert captions[0] == "a plain good photo" and "caption only in the json" in captions
  assert "caf\ufffd cr\ufffdme" in captions
  long = [c for c in captions if c.startswith("word")][0]
  assert len(long) <= 200 and not long.endswith(" ")
  for e in examples:   # every image is an RGB JPEG TF decodes, within max_side
    assert e["image"].ndim == 3 and e["image"].shape[2] == 3 and max(e["image"].shape[:2]) <= 64
  raw = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  assert all(tf.io.is_jpeg(e["image"]) for e in raw)
  keys = [e["key"].decode() for e in examples]
  assert not any("evil" in k or "link" in k or "dev" in k for k in keys)
  # Unsafe members were never written anywhere: not beside the shard, not in the outputs.
  written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
  assert not any("evil" in p or "passwd" in p for p in written)
  assert not os.path.exists("/abs/evil.jpg")
  # The same directory reads without a registered builder class, and the summary is on disk.
  directory = pair_dataset.version_dir(data_dir, "bad_pairs", "1.0.0")
  assert tfds.builder_from_directory(directory).info.splits["train"].num_examples == 9
  with open(os.path.join(directory, pair_dataset.SUMMARY)) as f:
    assert json.load(f)["skipped"] == expected["skipped"]


def test_truncated_tar_keeps_the_pairs_before_the_damage(tmp_path):
  good_tar(str(tmp_path / "full.tar"), 6, seed=1)
  data = (tmp_path / "full.tar").read_bytes()
  (tmp_path / "cut.tar").write_bytes(data[: int(len(data) * 0.6)])
  tasks = convert.plan_tasks(str(tmp_path / "cut.tar"), options=OPTIONS)
  summary = convert.convert(tasks, name="cut", data_dir=str(tmp_path / "tfds"), options=OPTIONS,
                            progress=False)
  assert summary["skipped"] == {"truncated_tar": 1}
  assert 1 <= summary["written"] < 6
  assert len(read_all(str(tmp_path / "tfds"), "cut")[1]) == summary["written"]


def test_csv_with_bad_rows(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  photo(seed=1).save(images / "a.jpg")
  photo(seed=2).convert("L").save(images / "grey.png")
  (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
  photo(seed=3).save(images / "c.jpg")
  Image.new("RGB", (2, 1)).save(images / "tiny.png")
  rows = [b"file\tcaption",
          b"images/a.jpg\ta dog on a beach",
          b"images/grey.png\ta grey cat",
          b"images/missing.jpg\tnot there",
          b"images/broken.jpg\tbroken file",
          b"images/c.jpg\t",
          b"\tno file name",
          b"images/c.jpg\tna\xefve caf\xe9",
          b"images/tiny.png\ttwo pixels"]
  (tmp_path / "captions.tsv").write_bytes(b"\n".join(rows) + b"\n")
  options = convert.Options(image=OPTIONS.image, image_column="file")
  tasks = convert.plan_tasks(csv=str(tmp_path / "captions.tsv"), rows_per_shard=3,
                             options=options)
  assert [(t.start, t.stop) for t in tasks] == [(0, 3), (3, 6), (6, 8)]
  summary = convert.convert(tasks, name="csv_pairs", data_dir=str(tmp_path / "tfds"),
                            options=options, progress=False)
  assert summary["written"] == 3
  assert summary["skipped"] == {"bad_row": 1, "empty_caption": 1, "missing_image": 1,
                                "too_small": 1, "undecodable_image": 1}
  assert summary["converted"] == {"caption_utf8_repaired": 1, "grayscale_to_rgb": 1}
  captions = sorted(e["caption"].decode() for e in read_all(str(tmp_path / "tfds"),
                                                             "csv_pairs")[1])
  assert captions == ["a dog on a beach", "a grey cat", "na\ufffdve caf\ufffd"]
  with pytest.raises(ValueError, match="no column"):
    convert.plan_tasks(csv=str(tmp_path / "captions.tsv"), options=convert.Options())


def test_resume_skips_finished_shards_and_ignores_partial_files(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for s in range(3):
    good_tar(str(src / f"{s:05d}.tar"), 4, seed=s)
  data_dir = str(tmp_path / "tfds")
  tasks = convert.plan_tasks(str(src / "{00000..00002}.tar"), options=OPTIONS)
  first = convert.convert(tasks, name="resumed", data_dir=data_dir, options=OPTIONS,
                          progress=False)
  directory = pair_dataset.version_dir(data_dir, "resumed", "1.0.0")
  done = pair_dataset.shard_path(directory, "resumed", 0, 3)
  redo = pair_dataset.shard_path(directory, "resumed", 2, 3)
  reference = open(redo, "rb").read()
  # Simulate an interruption: shard 2 lost, a half-written temporary file left behind.
  os.remove(redo)
  with open(redo + ".partial", "wb") as f:
    f.write(b"half a shard")
  os.remove(os.path.join(directory, "dataset_info.json"))
  done_stat = os.stat(done)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    datasets.prepare_dataset("resumed", data_dir, builtin=False)
  second = convert.convert(tasks, name="resumed", data_dir=data_dir, options=OPTIONS,
                           progress=False)
  assert second["shards_resumed"] == 2
  assert os.stat(done).st_mtime_ns == done_stat.st_mtime_ns      # not redone
  assert open(redo, "rb").read() == reference                       # redone identically
  assert not os.path.exists(redo + ".partial")
  assert {k: second[k] for k in ("written", "skipped", "num_bytes")} == \
      {k: first[k] for k in ("written", "skipped", "num_bytes")} == \
      {"written": 12, "skipped": {}, "num_bytes": first["num_bytes"]}
  assert len(read_all(data_dir, "resumed")[1]) == 12
  other = convert.Options(image=pair_cleaning.ImageOptions(max_side=32))
  with pytest.raises(ValueError, match="other inputs or options"):
    convert.convert(tasks, name="resumed", data_dir=data_dir, options=other, progress=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """Two shards converted by the CLI with 2 worker processes."""
  tmp = tmp_path_factory.mktemp("cli")
  src = tmp / "shards"
  src.mkdir()
  bad_tar(str(src / "00000.tar"))
  good_tar(str(src / "00001.tar"), 30, seed=7)
  data_dir = str(tmp / "tfds")
  result = subprocess.run(
      [sys.executable, "-m", "xclip_jax.data.convert", f"--tar={src}", "--name=my_pairs",
       f"--data_dir={data_dir}", "--workers=2", "--max_side=64", "--min_side=8",
       "--max_pixels=1000000", "--max_caption_chars=200"],
      cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  return data_dir, result


def test_cli_parallel_summary(converted):
  _, result = converted
  assert "pairs written: 39" in result.stdout
  assert "pairs skipped: 14" in result.stdout and "unsafe_tar_entry: 6" in result.stdout
  assert "100%" in result.stderr                                   # the progress bar finished


def test_tokenizer_cli_and_train_pipeline_on_converted_data(converted, tmp_path):
  data_dir, _ = converted
  model = str(tmp_path / "spm.model")
  result = subprocess.run(
      [sys.executable, "-m", "xclip_jax.data.tokenizer", "--dataset=my_pairs",
       f"--data_dir={data_dir}", "--text_key=caption", "--vocab_size=64", f"--output={model}"],
      cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  tokenizer = toklib.Tokenizer(model)
  assert tokenizer.decode(tokenizer.encode(["a red cat"], 16)) == ["a red cat"]

  c = cfglib.base_config()
  cfglib.apply_demo(c)
  c.data.update(dict(name="my_pairs", data_dir=data_dir, builtin=False, text_key="caption",
                     shuffle_buffer=64))
  ds = train_pipeline.make_train_dataset(c, tokenizer, views=views_lib.SINGLE, process_index=0,
                                   process_count=1, host_batch_size=8)
  batch = next(ds.as_numpy_iterator())
  assert batch["image"].shape == (8, 32, 32, 3) and batch["text"].shape == (8, 32)
  assert batch[global_batches.STATS_KEY]["records"] == 8
  assert sum(batch[global_batches.STATS_KEY][k] for k in train_pipeline.DROP_REASONS) == 0


def test_host_pipeline_benchmark_runs_every_mode(converted):
  from xclip_jax.data import bench   # noqa: PLC0415
  data_dir, _ = converted
  c = cfglib.base_config()
  c.data.update(dict(name="my_pairs", data_dir=data_dir, builtin=False, text_key="caption"))
  c.model.image.image_size, c.model.text.context_length = 32, 16
  tokenizer = toklib.Tokenizer(model_proto=toklib.train_tokenizer(["a red cat", "a dog"], 32))
  results = bench.run(c, tokenizer, records=16, batch=4, cores=1, seconds=0.2)
  assert set(results["modes"]) == set(bench.MODES) == {"decode", "clip", "two_views"}
  for r in results["modes"].values():
    assert r["images_per_sec"] > 0 and r["cpu_us_per_image"] > 0
    assert r["fraction_of_decode"] > 0 and r["cpu_fraction_of_decode"] > 0
  assert results["modes"]["decode"]["fraction_of_decode"] == 1.0
  assert results["text"]["tokenize_us_per_caption"] > 0
  assert results["text"]["eda_us_per_caption"] > 0


def test_host_pipeline_benchmark_cli_exits_0_and_writes_json(converted, tmp_path):
  data_dir, _ = converted
  out = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, "-m", "xclip_jax.data.bench", "--dataset=my_pairs",
       f"--data_dir={data_dir}", "--text_key=caption", "--records=8", "--batch=4", "--cores=1",
       "--seconds=0.1", "--image_size=32", "--context_length=16", f"--json={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  for mode in ("decode", "clip", "two_views"):
    assert re.search(rf"{mode}:.*images/s/core.*x decode", result.stdout), result.stdout
  saved = json.loads(out.read_text())
  assert set(saved["modes"]) == {"decode", "clip", "two_views"}
