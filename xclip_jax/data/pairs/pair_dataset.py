"""The on-disk form of a converted image-text dataset: a plain TFDS directory, no builder class.

  <data_dir>/<name>/<version>/
    <name>-train.tfrecord-00000-of-000NN   one TFRecord shard per input shard, TFDS naming
    dataset_info.json, features.json       written last, by TFDS (DatasetInfo.write_to_directory)
    convert_manifest.json                  inputs and options (a resume must match them)
    convert_shards/00000.json              per-shard counts (a shard is done when both exist)
    convert_summary.json                   totals: pairs written, skipped and converted by reason

`tfds.builder(name, data_dir=<data_dir>)` and `tfds.builder_from_directory(<version dir>)` read it
back (TFDS falls back to the files when no builder class is registered), so the train pipeline
only needs config.data.{name, data_dir, builtin=False, text_key="caption"}.

Features: image (JPEG, RGB, any size), caption (text), key (where the pair came from).
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_info as dataset_info_lib
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core import naming
from tensorflow_datasets.core import splits as splits_lib

SPLIT = "train"
SHARD_STATS_DIR = "convert_shards"
MANIFEST, SUMMARY = "convert_manifest.json", "convert_summary.json"


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "caption": tfds.features.Text(),
      "key": tfds.features.Text(),
  })


def version_dir(data_dir: str, name: str, version: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(data_dir)), name, version)


def _template(directory: str, name: str) -> naming.ShardedFileTemplate:
  return naming.ShardedFileTemplate(data_dir=directory, dataset_name=name, split=SPLIT,
                                    filetype_suffix="tfrecord")


def shard_path(directory: str, name: str, index: int, num_shards: int) -> str:
  return os.fspath(_template(directory, name).sharded_filepath(shard_index=index,
                                                              num_shards=num_shards))


def stats_path(directory: str, index: int) -> str:
  return os.path.join(directory, SHARD_STATS_DIR, f"{index:05d}.json")


def shard_done(directory: str, name: str, index: int, num_shards: int) -> bool:
  """A shard is done when its records and its counts were both renamed into place."""
  return (os.path.exists(shard_path(directory, name, index, num_shards))
          and os.path.exists(stats_path(directory, index)))


def write_json_atomically(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class ShardWriter:
  """Serialises examples with TFDS's own feature encoding and writes one shard atomically."""

  def __init__(self):
    self._features = features()
    self._serializer = example_serializer.ExampleSerializer(self._features.get_serialized_info())

  def serialize(self, image: bytes, caption: str, key: str) -> bytes:
    return self._serializer.serialize_example(
        self._features.encode_example({"image": image, "caption": caption, "key": key}))

  def write(self, path: str, records: Iterable[tuple[str, bytes]]) -> int:
    """Writes (key, serialized) records to `path` (the caller renames it into place); returns
    the file's size."""
    try:
      file_adapters.TfRecordFileAdapter.write_examples(path, records)
    except BaseException:
      if os.path.exists(path):
        os.remove(path)
      raise
    return os.path.getsize(path)


def write_dataset_info(directory: str, name: str, version: str, shard_lengths: list[int],
                       num_bytes: int, description: str) -> None:
  """dataset_info.json + features.json through TFDS: makes the directory a readable dataset."""
  identity = dataset_info_lib.DatasetIdentity(
      name=name, version=tfds.core.Version(version), data_dir=directory,
      module_name="xclip_jax.data.convert")
  split = splits_lib.SplitInfo(name=SPLIT, shard_lengths=list(shard_lengths),
                               num_bytes=int(num_bytes),
                               filename_template=_template(directory, name))
  info = dataset_info_lib.DatasetInfo(builder=identity, features=features(),
                                      description=description,
                                      split_dict=splits_lib.SplitDict([split]))
  info.write_to_directory(directory)
