"""Host input-pipeline benchmark: images/s (and per core) of the train pipeline's CPU work.

  python -m xclip_jax.data.bench --dataset=NAME --data_dir=DIR [--text_key=caption]
      [--records=2048] [--image_size=224] [--batch=128] [--cores=N] [--seconds=10] [--json=out.json]

Every mode runs on the same records, read once and cached in memory still encoded (so disk and
the shuffle buffer are left out), through the pipeline's own code (`pipeline.host_batches`):
  decode          decode only (tf.io.decode_image): the floor every other mode pays
  clip            decode + CLIP's crop/flip/normalise (1 view) + SentencePiece tokenization
  two_views       decode + two MoCo v2 views (DeCLIP, SLIP's extra views) + tokenization
tf.data gets `--cores` threads (private thread pool and parallel calls), so images/s/core is the
figure to size a host with: cores needed = global images/s per host / images/s/core.
The model step benchmark is `python -m xclip_jax.bench` (synthetic data, no input pipeline).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import tensorflow as tf

from xclip_jax import config as config_lib
from xclip_jax.data import image as image_lib
from xclip_jax.data import pipeline
from xclip_jax.data import tokenizer as tokenizer_lib

MODES = ("decode", "clip", "two_views")


def _options(cores: int) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = cores
  options.threading.max_intra_op_parallelism = 1
  options.autotune.cpu_budget = cores
  return options


def cached_records(config, records: int) -> tf.data.Dataset:
  """The first `records` encoded examples of the configured dataset, held in memory."""
  d = config.data
  builder = pipeline.prepare_dataset(d.name, d.data_dir, d.builtin)
  ds = builder.as_dataset(split=d.split, shuffle_files=False,
                          decoders=pipeline._skip_decoding(d.image_key))  # noqa: SLF001
  ds = ds.take(records).cache()
  count = sum(1 for _ in ds)   # fills the cache
  if count == 0:
    raise ValueError(f"{d.name}:{d.split} has no records.")
  return ds


def mode_dataset(mode: str, records: tf.data.Dataset, config, tokenizer, *, batch: int,
                 cores: int) -> tf.data.Dataset:
  if mode == "decode":
    def decode(example):
      return image_lib.decode(pipeline.get_numpy_field(example, config.data.image_key))
    ds = records.repeat().map(decode, num_parallel_calls=cores)
    ds = ds.map(lambda image: tf.shape(image))    # images differ in size: batch their shapes
    ds = ds.batch(batch)
  else:
    ds = pipeline.host_batches(records.repeat().enumerate(), config, tokenizer, seed=0,
                               host_batch_size=batch,
                               image_views=2 if mode == "two_views" else 1)
  return ds.prefetch(2).with_options(_options(cores))


def time_mode(ds: tf.data.Dataset, batch: int, seconds: float, warmup: int = 3) -> float:
  """Images/s over whole batches for at least `seconds` (after `warmup` batches)."""
  iterator = iter(ds)
  for _ in range(warmup):
    next(iterator)
  n, start = 0, time.perf_counter()
  while True:
    next(iterator)
    n += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds and n >= 3:
      return n * batch / elapsed


def run(config, tokenizer, *, records: int, batch: int, cores: int, seconds: float,
        modes=MODES) -> dict:
  config.data.num_parallel_calls = cores
  cached = cached_records(config, records)
  results = {"dataset": config.data.name, "records": records, "batch": batch, "cores": cores,
             "image_size": config.model.image.image_size, "modes": {}}
  for mode in modes:
    rate = time_mode(mode_dataset(mode, cached, config, tokenizer, batch=batch, cores=cores),
                     batch, seconds)
    results["modes"][mode] = {"images_per_sec": rate, "images_per_sec_per_core": rate / cores}
    print(f"{mode:>10}: {rate:9,.0f} images/s   {rate / cores:8,.0f} images/s/core", flush=True)
  return results


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415
  f = flags.FLAGS
  config = config_lib.base_config()
  config.data.update(dict(name=f.dataset, data_dir=f.data_dir, split=f.split,
                          image_key=f.image_key, text_key=f.text_key,
                          builtin=f.dataset in pipeline.EMBEDDED_DATASETS))
  config.model.image.image_size = f.image_size
  config.model.text.context_length = f.context_length
  if f.tokenizer:
    tokenizer = tokenizer_lib.Tokenizer(f.tokenizer)
  else:   # a small model from the dataset's own captions: tokenization cost, not quality
    captions = tokenizer_lib.dataset_captions(f.dataset, data_dir=f.data_dir or None,
                                              split=f.split, text_key=f.text_key,
                                              max_captions=20_000)
    tokenizer = tokenizer_lib.Tokenizer(
        model_proto=tokenizer_lib.train_tokenizer(captions, 4096))
  cores = f.cores or os.cpu_count() or 1
  print(f"{f.dataset}: {f.records} records cached encoded, {f.image_size}px, batch {f.batch}, "
        f"{cores} tf.data threads, {f.seconds:.0f} s per mode")
  results = run(config, tokenizer, records=f.records, batch=f.batch, cores=cores,
                seconds=f.seconds, modes=f.modes)
  decode_rate = results["modes"].get("decode", {}).get("images_per_sec")
  if decode_rate:
    for mode, r in results["modes"].items():
      r["fraction_of_decode"] = r["images_per_sec"] / decode_rate
  if f.json:
    with open(f.json, "w", encoding="utf-8") as out:
      json.dump(results, out, indent=2)
  return results


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("dataset", "xclip_demo", "TFDS dataset (converted or embedded).")
  flags.DEFINE_string("data_dir", "", "TFDS data_dir.")
  flags.DEFINE_string("split", "train", "Split to read records from.")
  flags.DEFINE_string("image_key", "image", "Image feature path.")
  flags.DEFINE_string("text_key", "captions/text", "Caption feature path ('caption' for "
                      "converted datasets).")
  flags.DEFINE_string("tokenizer", "", "SentencePiece model (default: train a small one).")
  flags.DEFINE_integer("records", 2048, "Records cached and cycled through.")
  flags.DEFINE_integer("image_size", 224, "Model input size (crop output).")
  flags.DEFINE_integer("context_length", 77, "Tokens per caption.")
  flags.DEFINE_integer("batch", 128, "Host batch size.")
  flags.DEFINE_integer("cores", 0, "tf.data threads (0 = all cores).")
  flags.DEFINE_float("seconds", 10.0, "Timed seconds per mode.")
  flags.DEFINE_list("modes", list(MODES), f"Subset of {MODES}.")
  flags.DEFINE_string("json", "", "Also write the results here.")
  app.run(main)
