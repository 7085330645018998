"""Data: the embedded demo dataset, image ops, caption sampling, train/eval pipelines, global batches.

The demo dataset comes from conftest's session fixture `demo_dir`.
"""

import hashlib
import re

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from xclip_jax import config as cfglib
from xclip_jax.data import datasets
from xclip_jax.data import eval_datasets
from xclip_jax.data import eval_image
from xclip_jax.data import global_batches
from xclip_jax.data import image as image_lib
from xclip_jax.data import tokenizer as toklib
from xclip_jax.data import train_pipeline
from xclip_jax.data import view_crops
from xclip_jax.data import views as views_lib
from xclip_jax.data.builders import xclip_demo as demo

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="session")
def demo_config(demo_dir):
  c = cfglib.base_config()
  cfglib.apply_demo(c)
  c.data.data_dir = demo_dir
  c.data.split = "train[:512]"
  c.data.shuffle_buffer = 256
  return c


@pytest.fixture(scope="session")
def demo_tokenizer(demo_config, tmp_path_factory):
  c = ml_collections.ConfigDict(demo_config.to_dict())
  c.tokenizer.path = str(tmp_path_factory.mktemp("spm") / "demo.model")
  return toklib.resolve_tokenizer(c, process_index=0)   # train_if_missing (demo config)


def _read(data_dir, split, n):
  ds = tfds.builder("xclip_demo", data_dir=data_dir).as_dataset(
      split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return list(ds.take(n).as_numpy_iterator())


# ---- the demo dataset -------------------------------------------------------------------------

def test_demo_splits_and_label_names(demo_dir):
  info = tfds.builder("xclip_demo", data_dir=demo_dir).info
  assert info.version == "1.0.0"
  assert info.splits["train"].num_examples == demo.NUM_TRAIN == 10_000
  assert info.splits["test"].num_examples == demo.NUM_TEST == 1_000
  names = info.features["label"].names
  assert len(names) == 64 and names[0] == "red circle" and "blue star" in names
  colors, shapes = info.features["color"].names, info.features["shape"].names
  assert names == [f"{c} {s}" for c in colors for s in shapes]
  assert info.supervised_keys == ("image", "label")


def test_demo_build_is_deterministic(tmp_path, monkeypatch):
  monkeypatch.setattr(demo, "NUM_TRAIN", 24)
  monkeypatch.setattr(demo, "NUM_TEST", 8)
  builds = []
  for name in ("a", "b"):
    builder = tfds.builder("xclip_demo", data_dir=str(tmp_path / name))
    builder.download_and_prepare()
    builds.append(_read(str(tmp_path / name), "train", 24))
  assert len(builds[0]) == 24
  for x, y in zip(*builds):
    assert x["image"] == y["image"] and list(x["captions"]["text"]) == list(y["captions"]["text"])
    assert x["label"] == y["label"]


def test_test_split_is_held_out():
  train = {demo.generate_example(demo.TRAIN_SEED, i)["image"] for i in range(20)}
  test = {demo.generate_example(demo.TEST_SEED, i)["image"] for i in range(20)}
  assert not train & test


def test_captions_name_the_labelled_colour_and_shape(demo_dir):
  examples = _read(demo_dir, "test", 300)
  all_captions = []
  for ex in examples:
    captions = [c.decode() for c in ex["captions"]["text"]]
    assert len(captions) == 3 == len(set(captions))
    assert ex["label"] == ex["color"] * 8 + ex["shape"]
    color, shape = demo.COLORS[ex["color"]], demo.SHAPES[ex["shape"]]
    for caption in captions:
      assert any(re.search(rf"\b{w}\b", caption) for w in demo.COLOR_WORDS[color]), caption
      assert any(re.search(rf"\b{w}\b", caption) for w in demo.SHAPE_WORDS[shape]), caption
    all_captions += captions
  assert len(set(all_captions)) > 800                           # wording varies a lot
  words = set(" ".join(all_captions).split())
  assert {"crimson", "scarlet", "disk", "donut", "left", "background"} <= words
  lengths = {len(c.split()) for c in all_captions}
  assert min(lengths) <= 3 and max(lengths) >= 10              # optional attributes come and go


def test_demo_images_are_64px_rgb(demo_dir):
  ex = _read(demo_dir, "train", 1)[0]
  image = image_lib.decode(ex["image"]).numpy()
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 5


# ---- image ops --------------------------------------------------------------------------------

def test_normalize_range():
  lo, hi = (0 - np.array(MEAN)) / STD, (1 - np.array(MEAN)) / STD
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (8, 8, 3)), tf.uint8)
  out = image_lib.normalize(image, MEAN, STD).numpy()
  assert (out >= lo - 1e-4).all() and (out <= hi + 1e-4).all()
  white = image_lib.normalize(tf.fill([2, 2, 3], 255), MEAN, STD).numpy()
  np.testing.assert_allclose(white[0, 0], hi, rtol=1e-5)


def test_full_scale_crop_is_the_whole_image():
  image = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
  uniforms = np.random.default_rng(3).random((1, 4, view_crops.ATTEMPTS))
  out = view_crops.decode_views(tf.io.encode_png(image).numpy(), uniforms, [(1.0, 1.0)], 32)[0]
  np.testing.assert_array_equal(out, image)               # uint8, bit for bit


def test_eval_transform_resizes_shorter_side_then_centre_crops():
  png = tf.io.encode_png(tf.zeros([40, 80, 3], tf.uint8))
  out = eval_image.eval_transform(png, size=32, mean=MEAN, std=STD)
  assert out.shape == (32, 32, 3)
  np.testing.assert_allclose(out.numpy()[0, 0], -np.array(MEAN) / STD, rtol=1e-5)


# ---- caption sampling -------------------------------------------------------------------------

def test_get_field_samples_each_caption_of_a_list():
  example = {"captions": {"text": tf.constant(["a", "b", "c"])}, "label": tf.constant(5)}
  picks = [datasets.get_field(example, "captions/text", tf.constant([i, 1])).numpy()
           for i in range(300)]
  counts = {p: picks.count(p) for p in set(picks)}
  assert set(counts) == {b"a", b"b", b"c"} and min(counts.values()) > 60
  again = datasets.get_field(example, "captions/text", tf.constant([5, 1])).numpy()
  assert again == picks[5]                                    # stateless: same seed, same pick
  assert datasets.get_field(example, "label").numpy() == 5     # scalars pass through
  empty = {"captions": {"text": tf.constant([], tf.string)}}
  assert datasets.get_field(empty, "captions/text", tf.constant([0, 0])).numpy() == b""
  with pytest.raises(KeyError, match="caption"):
    datasets.get_field(example, "caption")


# ---- pipelines --------------------------------------------------------------------------------

def test_train_dataset_shapes_and_determinism(demo_config, demo_tokenizer):
  assert demo_tokenizer.vocab_size <= demo_config.model.text.vocab_size
  make = lambda: train_pipeline.make_train_dataset(   # noqa: E731
      demo_config, demo_tokenizer, views=views_lib.SINGLE, process_index=0, process_count=1,
      host_batch_size=32)
  batch = next(make().as_numpy_iterator())
  assert set(batch) == {"image", "text", global_batches.STATS_KEY}
  # uint8 crops, neither flipped nor normalised (the train step does that on the device).
  assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["text"].shape == (32, demo_config.model.text.context_length)
  assert batch["text"].dtype == np.int32
  assert ((batch["text"] == toklib.EOS_ID).sum(1) == 1).all()
  # Real pixels, in 0..255 (not normalised): the demo's shapes on textured backgrounds.
  assert batch["image"].max() >= 200 and batch["image"].min() <= 40
  assert 25 < batch["image"].std() < 90
  again = next(make().as_numpy_iterator())
  np.testing.assert_array_equal(batch["image"], again["image"])
  np.testing.assert_array_equal(batch["text"], again["text"])
  # Each image is a crop of its record: its colours are the record's (a 0.8-1.0 crop of a 64 px
  # demo image resized to 32 px keeps the mean colour within a few levels).
  records = {}
  for ex in tfds.builder("xclip_demo", data_dir=demo_config.data.data_dir).as_dataset(
      split=demo_config.data.split).take(512).as_numpy_iterator():
    records.setdefault(tuple(ex["captions"]["text"]), ex["image"])
  captions = demo_tokenizer.decode(batch["text"])
  matched = 0
  for image, caption in zip(batch["image"], captions):
    candidates = [im for caps, im in records.items()
                  if caption.lower() in {c.decode().lower() for c in caps}]
    if candidates:
      matched += 1
      best = min(np.abs(im.reshape(-1, 3).mean(0) - image.reshape(-1, 3).mean(0)).max()
                 for im in candidates)
      assert best < 12, best
  assert matched >= 24


def test_process_slices_are_disjoint(demo_config, demo_tokenizer):
  c = ml_collections.ConfigDict(demo_config.to_dict())
  c.data.crop_scale, c.data.flip = (1.0, 1.0), False   # identity augmentation: images identify examples
  seen = []
  for process_index in range(2):
    ds = train_pipeline.make_train_dataset(c, demo_tokenizer, views=views_lib.SINGLE,
                                     process_index=process_index, process_count=2,
                                     host_batch_size=64)
    hashes = set()
    for batch in ds.take(4).as_numpy_iterator():
      hashes |= {hashlib.md5(x.tobytes()).hexdigest() for x in batch["image"]}
    seen.append(hashes)
  assert len(seen[0]) > 150 and len(seen[1]) > 150
  assert not seen[0] & seen[1]


def test_eval_dataset_pads_to_the_same_number_of_batches(demo_config):
  eval_cfg = ml_collections.ConfigDict(demo_config.evals.zeroshot.to_dict())
  eval_cfg.max_examples = 101
  total, lengths = 0, []
  for process_index in range(3):
    ds = eval_datasets.make_eval_dataset(eval_cfg, demo_config, process_index=process_index,
                                    process_count=3, host_batch_size=16)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == len(ds) == 3          # ceil(34 / 16) on every process
    lengths.append(len(batches))
    for b in batches:
      assert b["image"].shape == (16, 32, 32, 3) and b["label"].dtype == np.int32
      assert (b["image"][~b["mask"]] == 0).all()
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks[:masks.sum()].all()             # real examples first, padding after
    total += int(masks.sum())
  assert total == 101 and len(set(lengths)) == 1
  # The whole split, one process: 1000 examples in 4 batches of 256, the last one 232 real.
  ds = eval_datasets.make_classification_dataset(
      "xclip_demo", split="test", host_batch_size=256, image_size=32, mean=MEAN, std=STD,
      process_index=0, process_count=1, data_dir=demo_config.data.data_dir)
  masks = [b["mask"].sum() for b in ds.as_numpy_iterator()]
  assert masks == [256, 256, 256, 232]
  assert datasets.class_names("xclip_demo", demo_config.data.data_dir)[:2] == [
      "red circle", "red square"]


def test_unprepared_dataset_fails_fast_with_instructions(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build coco_captions"):
    datasets.prepare_dataset("coco_captions", str(tmp_path), builtin=False)
  with pytest.raises(FileNotFoundError, match="--config.data.name"):
    datasets.prepare_dataset("my_own_pairs", str(tmp_path), builtin=False)


# ---- global batches ---------------------------------------------------------------------------

def _mesh_sharding():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def test_global_batch_iterator_shards_over_the_batch_axis():
  sharding = _mesh_sharding()
  host = [{"image": np.full((16, 4, 4, 3), i, np.float32), "text": np.full((16, 8), i, np.int32)}
          for i in range(5)]
  with global_batches.GlobalBatchIterator(host, sharding, prefetch=2) as it:
    batches = list(it)
  assert len(batches) == 5
  for i, batch in enumerate(batches):
    assert batch["image"].shape == (16, 4, 4, 3) and batch["text"].shape == (16, 8)
    assert batch["image"].sharding == sharding
    assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 4, 4, 3)}
    assert len(batch["text"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(batch["text"]), host[i]["text"])
  # A tf.data dataset (the train pipeline's type) is read through as_numpy_iterator().
  ds = tf.data.Dataset.from_tensors({"mask": tf.ones([16], tf.bool)}).repeat(3)
  with global_batches.GlobalBatchIterator(ds, {"mask": sharding}) as it:   # a pytree of shardings
    assert [b["mask"].shape for b in it] == [(16,)] * 3


def test_global_batch_iterator_propagates_errors_and_closes():
  def broken():
    yield {"x": np.zeros((8, 2), np.float32)}
    raise ValueError("bad record")

  it = global_batches.GlobalBatchIterator(broken(), _mesh_sharding())
  assert next(it)["x"].shape == (8, 2)
  with pytest.raises(ValueError, match="bad record"):
    next(it)
  with pytest.raises(StopIteration):
    next(it)
  it.close()

  def endless():
    while True:
      yield {"x": np.zeros((8, 2), np.float32)}

  it = global_batches.GlobalBatchIterator(endless(), _mesh_sharding(), prefetch=1)
  next(it)
  it.close()
  assert not it._thread.is_alive()
