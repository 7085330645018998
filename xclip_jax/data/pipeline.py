"""Input pipelines: TFDS -> tf.data (this process's slice) -> numpy host batch -> global jax.Array.

The train pipeline keeps images encoded through the shuffle buffer (small buffer memory), decodes
and augments in a parallel map, batches, then tokenizes the batched caption strings with
SentencePiece in one `tf.numpy_function` call. Every random choice (file order, shuffle, crop,
flip, which caption) is derived from config.seed folded with the process index, so a run is
reproducible and processes read disjoint slices with different randomness.

TensorFlow is told to keep off GPUs at import: JAX owns the accelerators.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tensorflow_datasets.core.dataset_info import DatasetInfoFileError

from xclip_jax.data import eda
from xclip_jax.data import image as image_lib
from xclip_jax.data.global_batches import STATS_KEY, GlobalBatchIterator  # noqa: F401 (re-export)

try:   # TF must never allocate GPU memory that JAX needs; harmless on CPU-only machines.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:   # TF's devices were already initialised by someone else: nothing to do.
  pass

# Names served by our embedded builders (xclip_jax/data/builders): prepared on first use.
EMBEDDED_DATASETS = ("xclip_demo",)

# Train batches carry per-batch counters under STATS_KEY (host side only: GlobalBatchIterator
# sums them instead of making them device arrays). Records dropped from a batch, by reason:
#   undecodable_image  TF could not decode (corrupt, truncated, unknown format) or augment it
#   empty_caption      no non-empty caption
#   too_large_image    a JPEG/PNG header says more than config.data.max_image_pixels pixels
# and, for the rows kept: duplicated (a slot refilled with another row of the same batch, when
# more records were dropped than config.data.spare_records), caption_truncated (cut at the
# context length), caption_not_utf8 (invalid bytes replaced by U+FFFD), records (read).
DROP_REASONS = ("undecodable_image", "empty_caption", "too_large_image")
_OK, _EMPTY_CAPTION, _TOO_LARGE = 0, 1, 2
# A valid 1x1 PNG: decoded in place of a record already known to be dropped (cheap, never fails).
_PLACEHOLDER_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478"
    "9c63f8cfc0000003010100c9fe92ef0000000049454e44ae426082")


# ---- datasets ---------------------------------------------------------------------------------

def _base_name(name: str) -> str:
  return name.split(":")[0].split("/")[0]


def _not_prepared_message(name: str, data_dir: str) -> str:
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return (
      f"TFDS dataset {name!r} is not prepared in data_dir={where!r}. Either\n"
      f"  * prepare it there:  tfds build {_base_name(name)} --data_dir={where}\n"
      "    (manual datasets such as laion400m also need --manual_dir=...), or\n"
      "  * convert your own image-text pairs (img2dataset tar shards, or a CSV of image path +\n"
      "    caption):  python -m xclip_jax.data.convert --tar=... --name=NAME --data_dir=DIR\n"
      "    (docs/data.md; an interrupted conversion has no dataset_info.json until it is re-run\n"
      "    to completion), or\n"
      "  * point the config at a prepared dataset: --config.data.name=NAME "
      "--config.data.data_dir=DIR (and --config.data.text_key / image_key if they differ).")


def check_prepared(builder: tfds.core.DatasetBuilder, name: str, data_dir: str | None) -> None:
  """Raises FileNotFoundError (with how to fix it) unless `builder` has its data on disk."""
  if not builder.is_prepared():
    raise FileNotFoundError(_not_prepared_message(name, data_dir or ""))


def prepare_dataset(name: str, data_dir: str | None = "", builtin: bool | None = None
                    ) -> tfds.core.DatasetBuilder:
  """The TFDS builder for `name`, with its data on disk.

  Embedded datasets (`builtin`, or None = "if the name is one of EMBEDDED_DATASETS") are generated
  on first use and reused afterwards. Any other dataset must already be prepared: this fails fast,
  before any compilation, with a message saying how to prepare it or where to point the config.
  """
  import xclip_jax.data.builders  # noqa: F401,PLC0415  (registers the embedded builders)

  if builtin is None:
    builtin = _base_name(name) in EMBEDDED_DATASETS
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except (tfds.core.DatasetNotFoundError, DatasetInfoFileError) as e:
    raise FileNotFoundError(_not_prepared_message(name, data_dir)) from e
  if not builtin:
    check_prepared(builder, name, data_dir)
    return builder
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    except Exception:  # noqa: BLE001
      # Another process sharing data_dir finished first (its rename won); fine if data is there.
      builder = tfds.builder(name, data_dir=data_dir or None)
      if not builder.is_prepared():
        raise
  return builder


def class_names(name: str, data_dir: str | None = "", label_key: str = "label") -> list[str]:
  """Names of a prepared dataset's ClassLabel feature (for zero-shot prompts)."""
  feature = prepare_dataset(name, data_dir).info.features
  for part in label_key.split("/"):
    feature = feature[part]
  return list(feature.names)


# ---- features ---------------------------------------------------------------------------------

def get_field(example: dict, path: str, seed: tf.Tensor | None = None) -> tf.Tensor:
  """example["a"]["b"] for path "a/b". A list-valued field (rank >= 1, e.g. several captions)
  yields ONE element drawn uniformly (stateless under `seed`); an empty list yields ""."""
  value = example
  for part in path.split("/"):
    if not isinstance(value, dict) or part not in value:
      keys = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise KeyError(f"Feature path {path!r}: no {part!r} among {keys}.")
    value = value[part]
  if value.shape.rank == 0:
    return value
  value = tf.reshape(value, [-1])
  count = tf.shape(value)[0]
  if seed is None:
    index = tf.random.uniform([], 0, tf.maximum(count, 1), tf.int32)
  else:
    index = tf.random.stateless_uniform([], seed, 0, tf.maximum(count, 1), tf.int32)
  # Appending a default makes the empty case index 0 -> "" without a branch.
  return tf.concat([value, tf.zeros([1], value.dtype)], 0)[index]


def get_numpy_field(example: dict, path: str) -> Any:
  """example["a"]["b"] for path "a/b" on numpy examples (no sampling)."""
  for part in path.split("/"):
    example = example[part]
  return example


def get_caption(example: dict, path: str, seed: tf.Tensor) -> tf.Tensor:
  """Like get_field, but a list of captions is sampled among its non-empty ones only."""
  value = example
  for part in path.split("/"):
    if not isinstance(value, dict) or part not in value:
      return get_field(example, path, seed)   # raises the KeyError naming the available keys
    value = value[part]
  if value.shape.rank and value.dtype == tf.string:
    flat = tf.reshape(value, [-1])
    value = tf.boolean_mask(flat, tf.strings.length(tf.strings.strip(flat)) > 0)
  return get_field({"caption": value}, "caption", seed)


def _skip_decoding(image_key: str) -> dict:
  decoders: Any = tfds.decode.SkipDecoding()
  for part in reversed(image_key.split("/")):
    decoders = {part: decoders}
  return decoders


def _tf_data_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True                       # same seed -> same batches
  options.threading.private_threadpool_size = max(8, os.cpu_count() or 1)
  options.threading.max_intra_op_parallelism = 1     # parallelism comes from the maps, not ops
  return options


def process_seed(seed: int, process_index: int) -> int:
  """A 31-bit seed for this process: different per process, fixed per (seed, process)."""
  return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0] >> 1)


# ---- train ------------------------------------------------------------------------------------

def make_train_dataset(config, tokenizer, *, process_index: int, process_count: int,
                       host_batch_size: int, seed: int | None = None, start_step: int = 0,
                       image_views: int = 1, text_views: int = 1) -> tf.data.Dataset:
  """Endless batches {"image": float32 [b, S, S, 3], "text": int32 [b, L]} from this process's slice.

  image_views=2 adds "image2": both views then use the MoCo v2 augmentation of config.data.
  image_views=3 keeps CLIP's "image" and adds two MoCo v2 views "image2", "image3" (SLIP).
  text_views=2 adds "text_aug": the same caption after one EDA op (data/eda.py).
  Each batch also carries STATS_KEY: counters of the records dropped (see DROP_REASONS).
  `seed` (default config.seed) fixes every random choice. `start_step` resumes the stream exactly
  where an uninterrupted run would be at that step: the shuffled, still-encoded records of the
  steps before are read and dropped (no decoding; about a second per 100k records), and each
  example keeps its position-derived augmentation seed. A resumed run that does not need exact
  replay can instead pass a new `seed` and start_step=0 (config.data.exact_resume=False).
  """
  d = config.data
  builder = prepare_dataset(d.name, d.data_dir, d.builtin)
  seed = process_seed(config.seed if seed is None else seed, process_index)
  split = tfds.even_splits(d.split, n=process_count, drop_remainder=False)[process_index]
  read_config = tfds.ReadConfig(shuffle_seed=seed, options=_tf_data_options())
  ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config,
                          decoders=_skip_decoding(d.image_key))
  # Shuffle encoded records (a few KB each), then decode: the buffer stays small.
  ds = ds.repeat().shuffle(d.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  # Every step reads a fixed block of records (batch + spares), dropped ones included, so the
  # records before `start_step` are known without decoding them.
  first = start_step * (host_batch_size + d.spare_records)
  ds = ds.skip(first).enumerate(start=first)
  return host_batches(ds, config, tokenizer, seed=seed, host_batch_size=host_batch_size,
                      image_views=image_views, text_views=text_views)


def host_batches(ds: tf.data.Dataset, config, tokenizer, *, seed: int, host_batch_size: int,
                 image_views: int = 1, text_views: int = 1) -> tf.data.Dataset:
  """(position, encoded example) pairs -> tokenized train batches (see make_train_dataset).

  Each batch is built from the next block of host_batch_size + config.data.spare_records
  records: records that cannot be used (DROP_REASONS) are dropped and counted, the first
  host_batch_size usable ones are kept; if too few remain, usable rows of the block are repeated
  (counted as "duplicated"). A block with no usable record stops the run with an error: that
  is a wrong image_key/text_key or a broken dataset, not a few bad records.
  """
  d = config.data
  size = config.model.image.image_size
  context_length = config.model.text.context_length
  block = host_batch_size + d.spare_records
  parallel = tf.data.AUTOTUNE if d.num_parallel_calls < 0 else d.num_parallel_calls
  base_seed = tf.constant(seed, tf.int64)
  synonyms = eda.load_synonyms() if text_views == 2 else {}
  view = functools.partial(
      image_lib.view_transform, size=size, scale=tuple(d.view_crop_scale), flip=d.flip,
      jitter=tuple(d.color_jitter), jitter_prob=d.color_jitter_prob,
      grayscale_prob=d.grayscale_prob, blur_prob=d.blur_prob, blur_sigma=tuple(d.blur_sigma),
      mean=tuple(d.mean), std=tuple(d.std))

  def preprocess(index, example):
    # Per-example stateless seeds from (process seed, position in the stream): reproducible.
    image_seed, image2_seed, text_seed, eda_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.stack([base_seed, index]), 4))
    image_bytes = get_numpy_field(example, d.image_key)
    text = get_caption(example, d.text_key, text_seed)
    status = tf.where(tf.strings.length(tf.strings.strip(text)) == 0, _EMPTY_CAPTION, _OK)
    if d.max_image_pixels:
      too_large = image_lib.encoded_pixels(image_bytes) > d.max_image_pixels
      status = tf.where(tf.logical_and(status == _OK, too_large), _TOO_LARGE, status)
    # A record already known to be dropped decodes a tiny placeholder instead (never a bomb).
    image_bytes = tf.where(status == _OK, image_bytes, _PLACEHOLDER_PNG)
    out = {"text": text, "_status": status}
    if image_views == 2:      # DeCLIP: both views augmented
      out["image"], out["image2"] = view(image_bytes, image_seed), view(image_bytes, image2_seed)
    else:                     # CLIP's view, plus (SLIP) two augmented self-supervised views
      out["image"] = image_lib.train_transform(
          image_bytes, image_seed, size=size, scale=tuple(d.crop_scale), flip=d.flip,
          mean=tuple(d.mean), std=tuple(d.std))
      if image_views == 3:
        seed2, seed3 = tf.unstack(tf.random.experimental.stateless_split(image2_seed, 2))
        out["image2"], out["image3"] = view(image_bytes, seed2), view(image_bytes, seed3)
    if text_views == 2:
      out["eda_seed"] = eda_seed[0]
    return out

  def preprocess_block(*window):
    # A failing decode raises inside tf.data; ignore_errors drops that record only. The empty
    # batch appended (then take(1)) keeps one output per block even if every record failed.
    records = tf.data.Dataset.zip(window).map(preprocess, num_parallel_calls=parallel,
                                              deterministic=True)
    records = records.ignore_errors(log_warning=True)
    empty = tf.nest.map_structure(lambda spec: tf.zeros([0] + spec.shape.as_list(), spec.dtype),
                                  records.element_spec)
    return records.batch(block).concatenate(tf.data.Dataset.from_tensors(empty)).take(1)

  def select(rows):
    status = rows.pop("_status")
    decoded = tf.shape(status, out_type=tf.int64)[0]
    usable = tf.reshape(tf.where(tf.equal(status, _OK)), [-1])
    count = tf.size(usable, out_type=tf.int64)
    check = tf.debugging.assert_positive(
        count, message=f"None of {block} consecutive records could be used (undecodable images "
        f"or empty captions): check config.data.image_key={d.image_key!r} and text_key="
        f"{d.text_key!r}, and the dataset (the tf.data warnings above name the errors).")
    with tf.control_dependencies([check]):
      pick = tf.gather(usable, tf.range(host_batch_size, dtype=tf.int64) % count)
    out = {k: tf.gather(v, pick) for k, v in rows.items()}
    out[STATS_KEY] = {
        "records": tf.constant(block, tf.int64),
        "undecodable_image": block - decoded,
        "empty_caption": tf.reduce_sum(tf.cast(status == _EMPTY_CAPTION, tf.int64)),
        "too_large_image": tf.reduce_sum(tf.cast(status == _TOO_LARGE, tf.int64)),
        "duplicated": tf.maximum(host_batch_size - count, 0)}
    for k, v in out.items():
      if k != STATS_KEY:
        v.set_shape([host_batch_size] + v.shape.as_list()[1:])
    return out

  ds = ds.window(block, drop_remainder=True)
  ds = ds.interleave(preprocess_block, cycle_length=2, block_length=1, num_parallel_calls=2,
                     deterministic=True)
  ds = ds.map(select, num_parallel_calls=parallel)

  def texts_of(raw: np.ndarray) -> tuple[list[str], int]:
    texts, invalid = [], 0
    for t in raw.tolist():
      try:
        texts.append(t.decode("utf-8"))
      except UnicodeDecodeError:
        texts.append(t.decode("utf-8", errors="replace"))
        invalid += 1
    return texts, invalid

  def tokenize(raw: np.ndarray):
    texts, invalid = texts_of(raw)
    ids, truncated = tokenizer.encode(texts, context_length, return_truncated=True)
    return ids, np.array([truncated, invalid], np.int64)

  def tokenize_eda(raw: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    captions = [eda.augment(t, np.random.default_rng(int(s) & 0x7FFFFFFFFFFFFFFF), synonyms)
                for t, s in zip(texts_of(raw)[0], seeds.tolist())]
    return tokenizer.encode(captions, context_length)

  def tokenize_batch(batch):
    out = {k: v for k, v in batch.items() if k not in ("text", "eda_seed")}
    out["text"], counts = tf.numpy_function(tokenize, [batch["text"]], (tf.int32, tf.int64),
                                            stateful=False)
    out["text"].set_shape([host_batch_size, context_length])
    out[STATS_KEY] = dict(batch[STATS_KEY], caption_truncated=counts[0],
                          caption_not_utf8=counts[1])
    if text_views == 2:
      out["text_aug"] = tf.numpy_function(tokenize_eda, [batch["text"], batch["eda_seed"]],
                                          tf.int32, stateful=False)
      out["text_aug"].set_shape([host_batch_size, context_length])
    return out

  ds = ds.map(tokenize_batch, num_parallel_calls=parallel)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_tf_data_options())


# ---- eval ------------------------------------------------------------------------------------

# The evaluation datasets live in eval_datasets.py (which imports this module); the old names
# keep working from here, resolved on first use.
_EVAL_NAMES = ("make_eval_dataset", "make_classification_dataset", "split_size", "read_texts")


def __getattr__(name: str):
  if name in _EVAL_NAMES:
    from xclip_jax.data import eval_datasets  # noqa: PLC0415
    return getattr(eval_datasets, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
