"""TFDS datasets: preparing them (embedded ones on first use, clear errors for the rest) and
reading their fields. The train pipeline (train_pipeline.py) and the evaluation datasets
(eval_datasets.py) read through these.

Every random choice is derived from config.seed folded with the process index, so a run is
reproducible and processes read disjoint slices with different randomness.

TensorFlow is told to keep off GPUs at import: JAX owns the accelerators.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tensorflow_datasets.core.dataset_info import DatasetInfoFileError

try:   # TF must never allocate GPU memory that JAX needs; harmless on CPU-only machines.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:   # TF's devices were already initialised by someone else: nothing to do.
  pass


# Names served by our embedded builders (xclip_jax/data/builders): prepared on first use.
EMBEDDED_DATASETS = ("xclip_demo",)

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

def lookup(example: dict, path: str):
  """example["a"]["b"] for path "a/b", as stored (a KeyError names the keys there are)."""
  value = example
  for part in path.split("/"):
    if not isinstance(value, dict) or part not in value:
      keys = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise KeyError(f"Feature path {path!r}: no {part!r} among {keys}.")
    value = value[part]
  return value


def get_field(example: dict, path: str, seed: tf.Tensor | None = None) -> tf.Tensor:
  """example["a"]["b"] for path "a/b". A list-valued field (rank >= 1, e.g. several captions)
  yields ONE element drawn uniformly (stateless under `seed`); an empty list yields ""."""
  value = lookup(example, path)
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


def skip_decoding(image_key: str) -> dict:
  decoders: Any = tfds.decode.SkipDecoding()
  for part in reversed(image_key.split("/")):
    decoders = {part: decoders}
  return decoders


def read_only(builder: tfds.core.DatasetBuilder, image_key: str, text_key: str, *,
              fix: str = "check config.data.image_key / text_key") -> tfds.decode.PartialDecoding:
  """TFDS decoders that parse only the image (left encoded) and the text of each example.
  A path that is not a feature raises a KeyError naming the features there, then `fix`."""
  wanted: dict = {}
  for path in (image_key, text_key):
    feature, node = builder.info.features, wanted
    parts = path.split("/")
    for depth, part in enumerate(parts):
      if part not in getattr(feature, "keys", lambda: ())():
        known = sorted(feature.keys()) if hasattr(feature, "keys") else type(feature).__name__
        raise KeyError(f"Feature path {path!r} of {builder.name}: no {part!r} among {known}; "
                       f"{fix}.")
      feature = feature[part]
      node = node.setdefault(part, True if depth == len(parts) - 1 else {})
  return tfds.decode.PartialDecoding(wanted, decoders=skip_decoding(image_key))


def tf_data_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True                       # same seed -> same batches
  options.threading.private_threadpool_size = max(8, os.cpu_count() or 1)
  options.threading.max_intra_op_parallelism = 1     # parallelism comes from the maps, not ops
  return options


def process_seed(seed: int, process_index: int) -> int:
  """A 31-bit seed for this process: different per process, fixed per (seed, process)."""
  return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0] >> 1)
