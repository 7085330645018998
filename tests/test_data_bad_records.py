"""The train pipeline on a TFDS dataset holding bad records (written raw, not cleaned by the
converter): dropped and counted by reason, refilled from spares, exact resume and determinism
kept, counters summed by GlobalBatchIterator and logged by train.
"""

import io
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from xclip_jax import config as cfglib
from xclip_jax import train
from xclip_jax.data import global_batches
from xclip_jax.data import tokenizer as toklib
from xclip_jax.data import train_pipeline
from xclip_jax.data import views as views_lib
from xclip_jax.data.pairs import pair_dataset


def _jpeg(w, h, seed):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  pixels = (np.sin(x / 9 + seed)[..., None] * 90 + 128 + rng.normal(0, 10, (h, w, 3)))
  out = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
  return out.getvalue()


def _png(w, h, seed):
  out = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)).save(
      out, format="PNG")
  return out.getvalue()


def _twelve_bit(jpeg):
  """The same JPEG claiming 12-bit samples: a whole file with a readable header that TF's
  (8-bit) decoder refuses."""
  frame = jpeg.index(b"\xff\xc0")
  return jpeg[:frame + 4] + b"\x0c" + jpeg[frame + 5:]


def _write(data_dir, name, records):
  directory = pair_dataset.version_dir(data_dir, name, "1.0.0")
  os.makedirs(directory)
  writer = pair_dataset.ShardWriter()
  path = pair_dataset.shard_path(directory, name, 0, 1)
  size = writer.write(path, ((str(i), writer.serialize(img, cap, str(i)))
                             for i, (img, cap) in enumerate(records)))
  pair_dataset.write_dataset_info(directory, name, "1.0.0", [len(records)], size, "test")


# Record i: a 24x20 PNG captioned "photo number i", except these.
BAD = {1: (b"not an image", None),                    # undecodable
       3: (None, ""),                                 # empty caption
       5: ("truncated", None),                        # undecodable (truncated PNG)
       9: ("large", None),                            # 200x100 > max_image_pixels
       17: (None, b"caf\xe9 photo number 17"),        # not UTF-8: kept, repaired, counted
       18: (None, "photo number 18 " + "and more " * 100)}   # cut at the context length


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bad")
  records = []
  for i in range(24):
    image, caption = _png(24, 20, i), f"photo number {i}"
    bad_image, bad_caption = BAD.get(i, (None, None))
    if bad_image == "truncated":
      image = image[: len(image) // 2]
    elif bad_image == "large":
      image = _png(200, 100, i)
    elif bad_image is not None:
      image = bad_image
    records.append((image, caption if bad_caption is None else bad_caption))
  _write(str(tmp), "bad_records", records)
  _write(str(tmp), "all_bad", [(b"garbage", "a caption")] * 8)
  # JPEGs, every third cut at 70%: the rows above the cut still decode on their own.
  jpegs = [_jpeg(64, 96, i) for i in range(12)]
  _write(str(tmp), "truncated_jpegs", [(j[: int(len(j) * 0.7)] if i % 3 == 0 else j,
                                        f"photo number {i}") for i, j in enumerate(jpegs)])
  # Complete-looking JPEGs (end-of-image marker, readable header) that libjpeg refuses (12-bit
  # precision): found only when a chunk's decode loop fails, then record by record.
  clean = [_jpeg(96, 64, 100 + i) for i in range(18)]
  _write(str(tmp), "clean_jpegs", [(j, f"photo number {i}") for i, j in enumerate(clean)])
  refused = [_twelve_bit(j) if i in (2, 7) else j[: len(j) // 2] if i == 4 else j
             for i, j in enumerate(clean)]
  _write(str(tmp), "refused_jpegs", [(j, f"photo number {i}") for i, j in enumerate(refused)])
  tokenizer = toklib.Tokenizer(model_proto=toklib.train_tokenizer(
      [f"photo number {i}" for i in range(24)] + ["and more caf"], 64))
  return str(tmp), tokenizer


def _config(data_dir, name="bad_records", **data):
  c = cfglib.base_config()
  cfglib.apply_demo(c)
  c.data.update(dict(name=name, data_dir=data_dir, builtin=False, text_key="caption",
                     shuffle_buffer=1, max_image_pixels=10_000, spare_records=2,
                     crop_scale=(1.0, 1.0), flip=False))
  c.data.update(data)
  return c


def _batches(config, tokenizer, n, **kw):
  ds = train_pipeline.make_train_dataset(config, tokenizer, views=views_lib.SINGLE, process_index=0,
                                   process_count=1, host_batch_size=6, **kw)
  return list(ds.take(n).as_numpy_iterator())


def test_bad_records_are_dropped_and_counted_exactly(bad_dataset):
  data_dir, tokenizer = bad_dataset
  # No shuffle, 6 rows + 2 spares per batch: 3 batches read the 24 records exactly once.
  batches = _batches(_config(data_dir), tokenizer, 3)
  totals = {k: sum(int(b[global_batches.STATS_KEY][k]) for b in batches)
            for k in batches[0][global_batches.STATS_KEY]}
  assert totals == {"records": 24, "undecodable_image": 2, "empty_caption": 1,
                    "too_large_image": 1, "duplicated": 1, "caption_not_utf8": 1,
                    "caption_truncated": 1}
  texts = [tokenizer.decode(b["text"]) for b in batches]
  # Block 0 (records 0-7) lost 1, 3 and 5: five usable rows, the first one fills the sixth slot.
  assert texts[0] == [f"photo number {i}" for i in (0, 2, 4, 6, 7, 0)]
  # Block 1 lost 9: the first six usable records, no repeats.
  assert texts[1] == [f"photo number {i}" for i in (8, 10, 11, 12, 13, 14)]
  assert texts[2][1].endswith("photo number 17") and texts[2][2].startswith("photo number 18")
  for b in batches:
    assert b["image"].shape == (6, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["image"].std() > 30           # the records' random pixels, not placeholders


def test_exact_resume_and_determinism_with_bad_records(bad_dataset):
  data_dir, tokenizer = bad_dataset
  config = _config(data_dir, shuffle_buffer=16)
  full = _batches(config, tokenizer, 6)
  assert sum(int(b[global_batches.STATS_KEY]["undecodable_image"]) for b in full) > 0
  resumed = _batches(config, tokenizer, 2, start_step=4)
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"], b["text"])
    assert a[global_batches.STATS_KEY] == b[global_batches.STATS_KEY]
  again = _batches(config, tokenizer, 6)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_a_block_without_any_usable_record_stops_with_a_clear_error(bad_dataset):
  data_dir, tokenizer = bad_dataset
  with pytest.raises(tf.errors.InvalidArgumentError, match="None of 8 consecutive records"):
    _batches(_config(data_dir, name="all_bad"), tokenizer, 1)


def test_counters_reach_the_train_metrics(bad_dataset):
  data_dir, tokenizer = bad_dataset
  ds = train_pipeline.make_train_dataset(_config(data_dir), tokenizer, views=views_lib.SINGLE,
                                   process_index=0, process_count=1, host_batch_size=8)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with global_batches.GlobalBatchIterator(ds, NamedSharding(mesh, P("data"))) as batches:
    batch = next(batches)
    assert set(batch) == {"image", "text"}     # counters stay on the host
    next(batches)
    counters = train._data_counters(batches)
  assert counters["data/records"] == 20.0     # two blocks of 8 + 2 spares
  assert counters["data/undecodable_image"] == 2.0 and counters["data/empty_caption"] == 1.0


def test_truncated_jpegs_are_dropped_though_only_a_window_is_decoded(bad_dataset):
  data_dir, tokenizer = bad_dataset
  # Small crops (3-6% of the area): most windows lie wholly above or below the cut.
  config = _config(data_dir, name="truncated_jpegs", crop_scale=(0.03, 0.06),
                   max_image_pixels=0, spare_records=0)
  batches = _batches(config, tokenizer, 2)          # 12 records, once
  assert sum(int(b[global_batches.STATS_KEY]["undecodable_image"]) for b in batches) == 4
  texts = [t for b in batches for t in tokenizer.decode(b["text"])]
  assert not {f"photo number {i}" for i in (0, 3, 6, 9)} & set(texts)


def _by_caption(batches, tokenizer):
  return {t: image for b in batches for t, image in zip(tokenizer.decode(b["text"]), b["image"])}


def test_a_refused_decode_redoes_its_chunk_and_keeps_every_other_record_as_it_was(bad_dataset):
  data_dir, tokenizer = bad_dataset
  config = _config(data_dir, name="refused_jpegs", crop_scale=(0.3, 0.6), max_image_pixels=0,
                   spare_records=3)
  batches = _batches(config, tokenizer, 2)               # 2 blocks of 6 + 3 = the 18 records
  counts = {k: sum(int(b[global_batches.STATS_KEY][k]) for b in batches)
            for k in ("undecodable_image", "duplicated")}
  assert counts == {"undecodable_image": 3, "duplicated": 0}
  refused = _by_caption(batches, tokenizer)
  assert len(refused) == 12 and not {f"photo number {i}" for i in (2, 4, 7)} & set(refused)
  # The records kept are bit for bit what the same records give in a dataset without bad ones:
  # a record's crop follows from (seed, position), whichever path decoded its chunk.
  clean = _by_caption(_batches(_config(data_dir, name="clean_jpegs", crop_scale=(0.3, 0.6),
                                       max_image_pixels=0, spare_records=3), tokenizer, 2),
                      tokenizer)
  shared = set(refused) & set(clean)
  assert len(shared) == 10                              # records 0 1 3 5 and 9..14
  for caption in shared:
    np.testing.assert_array_equal(refused[caption], clean[caption])


def test_chunks_and_block_sizes_do_not_change_a_records_crop(bad_dataset, monkeypatch):
  data_dir, tokenizer = bad_dataset
  config = _config(data_dir, crop_scale=(0.2, 0.5))
  whole = _batches(config, tokenizer, 3)
  monkeypatch.setattr(train_pipeline, "CHUNK_RECORDS", 3)   # blocks of 8: 3 chunks, 1 padded
  chunked = _batches(config, tokenizer, 3)
  for a, b in zip(whole, chunked):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"], b["text"])
    assert a[global_batches.STATS_KEY] == b[global_batches.STATS_KEY]
  # Per-position randomness: blocks of 4 and of 8 records crop each record alike.
  clean = _config(data_dir, name="clean_jpegs", crop_scale=(0.2, 0.5), spare_records=0)
  fours = list(train_pipeline.make_train_dataset(clean, tokenizer, views=views_lib.SINGLE,
                                                 process_index=0, process_count=1,
                                                 host_batch_size=4).take(2).as_numpy_iterator())
  eights = list(train_pipeline.make_train_dataset(clean, tokenizer, views=views_lib.SINGLE,
                                                  process_index=0, process_count=1,
                                                  host_batch_size=8).take(1).as_numpy_iterator())
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in fours]), eights[0]["image"])
  assert len({x.tobytes() for x in eights[0]["image"]}) == 8
