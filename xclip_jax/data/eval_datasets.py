"""Evaluation datasets: one exact pass over a TFDS split in padded, masked host batches.

Every process reads its own slice (`tfds.even_splits`) and yields the same number of batches, so
each batch can become one global array; padding rows carry mask False and are never counted.
Undecodable images are dropped from the pass (the rest keep their exact results and positions)
and their number is the split's size minus the rows counted: `expected_examples` gives the size.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from xclip_jax.data import eval_image
from xclip_jax.data.datasets import (skip_decoding, tf_data_options, get_field,
                                     get_numpy_field, prepare_dataset)


def make_eval_dataset(eval_cfg, config, *, process_index: int, process_count: int,
                      host_batch_size: int, split: str | None = None,
                      label_map: Sequence[int] | None = None) -> tf.data.Dataset:
  """`make_classification_dataset` for an entry of config.evals (e.g. config.evals.zeroshot).

  Reads eval_cfg.{dataset, data_dir (falls back to config.data.data_dir), split (unless `split`
  is given; "auto": the curated benchmark's, else "test"), image_key, label_key, max_examples};
  image size and normalisation come from the model/train config, the transform from
  config.evals.transform.
  """
  from xclip_jax.evaluate import benchmarks  # noqa: PLC0415
  builtin = None   # embedded datasets (by name) are prepared on first use
  if eval_cfg.dataset == config.data.name:
    builtin = config.data.builtin
  return make_classification_dataset(
      eval_cfg.dataset, split=split or benchmarks.eval_split(eval_cfg.dataset, eval_cfg.split),
      host_batch_size=host_batch_size,
      image_size=config.model.image.image_size, mean=config.data.mean, std=config.data.std,
      process_index=process_index, process_count=process_count,
      data_dir=eval_cfg.data_dir or config.data.data_dir, builtin=builtin,
      image_key=eval_cfg.image_key, label_key=eval_cfg.label_key,
      max_examples=eval_cfg.max_examples, transform=eval_transform_name(config),
      label_map=label_map)


def eval_transform_name(config) -> str:
  """config.evals.transform, checked (configs saved before the field existed: the 256/224 one)."""
  return eval_image.check_transform(config.evals.get("transform", "resize_256_crop_224"))


def split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Examples in `split` (slices allowed): from the dataset info, else by the reader's cardinality
  (datasets whose info does not list their splits, e.g. under tfds.testing.mock_data)."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError):
    cardinality = int(builder.as_dataset(split=split, decoders=_skip_all(builder)).cardinality())
    if cardinality < 0:
      raise ValueError(f"Cannot tell how many examples {builder.name}:{split} has.") from None
    return cardinality


def _skip_all(builder: tfds.core.DatasetBuilder) -> dict:
  """Decoders that leave every image feature encoded (counting must not decode)."""
  return {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
          if isinstance(f, tfds.features.Image)}


def _sliced(split: str, max_examples: int) -> str:
  if not max_examples:
    return split
  if "[" in split or "+" in split:
    raise ValueError(f"max_examples needs a plain split name, not {split!r}; slice instead.")
  return f"{split}[:{max_examples}]"


def expected_examples(name: str, *, split: str, data_dir: str | None = "",
                      builtin: bool | None = None, max_examples: int = 0) -> int:
  """Examples an exact pass over `split` (after max_examples) holds, bad records included."""
  return split_size(prepare_dataset(name, data_dir, builtin), _sliced(split, max_examples))


def read_texts(name: str, *, split: str, text_key: str, data_dir: str | None = "",
               builtin: bool | None = None, image_key: str = "image") -> list[list[str]]:
  """Every caption of every example of `split`, in order (images are not decoded)."""
  builder = prepare_dataset(name, data_dir, builtin)
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=skip_decoding(image_key))
  texts = []
  for example in ds.as_numpy_iterator():
    value = get_numpy_field(example, text_key)
    values = value.tolist() if isinstance(value, np.ndarray) else [value]
    texts.append([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values])
  return texts


def make_classification_dataset(name: str, *, split: str, host_batch_size: int, image_size: int,
                                mean, std, process_index: int, process_count: int,
                                data_dir: str | None = "", builtin: bool | None = None,
                                image_key: str = "image", label_key: str = "label",
                                max_examples: int = 0, transform: str = "resize_256_crop_224",
                                label_map: Sequence[int] | None = None) -> tf.data.Dataset:
  """One pass over `split` in fixed-size batches {"image", "label" int32, "index" int32, "mask"}.

  "index" is the example's position in the whole split (-1 for padding), so results gathered from
  several processes can be matched to the split's other fields; label_key="" gives label 0.
  `transform` names the image transform (data/eval_image.py). `label_map[tfds_label]` is the
  label to emit (for a benchmark whose classes are a subset, e.g. ImageNet-A); a record whose
  mapped label is negative stops the pass with an error.

  The last partial batch is padded (mask False), and processes with fewer examples append fully
  masked batches, so every process yields the same number of batches (len(ds)) — required when
  each batch becomes one global array. Records whose image cannot be decoded are skipped (logged
  by tf.data) and replaced by padding at the end, so the number of batches stays the same; sum of
  all masks == examples in the split - skipped records.
  """
  builder = prepare_dataset(name, data_dir, builtin)
  split = _sliced(split, max_examples)
  eval_image.check_transform(transform)
  process_splits = tfds.even_splits(split, n=process_count, drop_remainder=False)
  counts = [split_size(builder, s) for s in process_splits]
  num_batches = max(1, math.ceil(max(counts) / host_batch_size))
  offset = sum(counts[:process_index])
  table = None
  if label_map is not None:
    table = tf.constant(np.asarray(label_map, np.int32))

  ds = builder.as_dataset(split=process_splits[process_index], shuffle_files=False,
                          decoders=skip_decoding(image_key),
                          read_config=tfds.ReadConfig(options=tf_data_options()))

  def preprocess(index, example):
    image = eval_image.eval_transform(get_numpy_field(example, image_key), size=image_size,
                                      mean=tuple(mean), std=tuple(std), transform=transform)
    label = (tf.cast(get_field(example, label_key), tf.int32) if label_key
             else tf.constant(0, tf.int32))
    return {"image": image, "label": label, "index": tf.cast(index + offset, tf.int32),
            "mask": tf.constant(True)}

  def map_label(example):
    label = tf.gather(table, example["label"])
    check = tf.debugging.assert_non_negative(
        label, message=f"{name}:{split} holds a label outside the evaluated classes.")
    with tf.control_dependencies([check]):
      return dict(example, label=tf.identity(label))

  ds = ds.enumerate().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  # A failed decode raises inside the map; ignore_errors drops that record only (the label
  # check comes after it, so its error stops the pass).
  ds = ds.ignore_errors(log_warning=True)
  if table is not None:
    ds = ds.map(map_label, num_parallel_calls=tf.data.AUTOTUNE)
  rows = num_batches * host_batch_size
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([image_size, image_size, 3], tf.float32),
      "label": tf.constant(0, tf.int32), "index": tf.constant(-1, tf.int32),
      "mask": tf.constant(False)}).repeat(rows)
  ds = ds.concatenate(padding).take(rows).batch(host_batch_size, drop_remainder=True)
  ds = ds.apply(tf.data.experimental.assert_cardinality(num_batches))
  return ds.prefetch(tf.data.AUTOTUNE).with_options(tf_data_options())


def skipped_records(name: str, split: str, expected: int, counted: int) -> int:
  """Records of a pass that could not be used (expected - counted); logged, and an error when
  none could (a wrong image_key or a broken dataset, not a few bad records)."""
  skipped = expected - counted
  if expected and skipped == expected:
    raise ValueError(f"None of the {expected} images of {name}:{split} could be decoded: check "
                     "the evaluator's image_key and the dataset (tf.data's warnings name the "
                     "errors).")
  if skipped:
    logging.warning("%s:%s: %d of %d records skipped (undecodable images).", name, split,
                    skipped, expected)
  return skipped
