"""Host input-pipeline benchmark: images/s (and per core) of the train pipeline's CPU work.

  python -m xclip_jax.data.bench --dataset=NAME --data_dir=DIR [--text_key=caption]
      [--records=2048] [--image_size=224] [--batch=128] [--cores=N] [--seconds=10] [--json=out.json]

Every mode runs on the same records, read once and cached in memory still encoded (so disk and
the shuffle buffer are left out), through the pipeline's own code (`train_pipeline.host_batches`)
with a method's declared views (xclip_jax/methods/):
  decode          decode only (tf.io.decode_image of the whole image): the floor
  clip            CLIP's views: one "clip" crop + tokenization (CLIP, SigLIP, nCLIP, xCLIP)
  two_views       DeCLIP's views: two "ssl" crops from one decode + the caption's EDA variant +
                  tokenization of both texts
  slip            (not run by default: --modes=decode,slip) SLIP's views: a "clip" crop and two
                  "ssl" crops from one decode + tokenization
Each is printed per core and as a fraction of decode-only. Then, on one core, the text side per
caption: tokenization (one SentencePiece call per batch) and EDA.
tf.data gets `--cores` threads (private thread pool and parallel calls), so images/s/core is the
figure to size a host with: cores needed = global images/s per host / images/s/core. What the
device then does (flip, colour, blur, normalisation) is in `python -m xclip_jax.bench`.
"""

from __future__ import annotations

import json
import os
import random
import time

import tensorflow as tf

from xclip_jax import config as config_lib
from xclip_jax import methods
from xclip_jax.data import eda
from xclip_jax.data import image as image_lib
from xclip_jax.data import datasets
from xclip_jax.data import tokenizer as tokenizer_lib
from xclip_jax.data import train_pipeline

MODES = ("decode", "clip", "two_views")                   # the default set
MODE_METHODS = {"clip": "clip", "two_views": "declip", "slip": "slip"}   # whose views a mode runs


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
  builder = datasets.prepare_dataset(d.name, d.data_dir, d.builtin)
  ds = builder.as_dataset(split=d.split, shuffle_files=False,
                          decoders=datasets.read_only(builder, d.image_key, d.text_key))
  ds = ds.take(records).cache()
  count = sum(1 for _ in ds)   # fills the cache
  if count == 0:
    raise ValueError(f"{d.name}:{d.split} has no records.")
  return ds


def mode_dataset(mode: str, records: tf.data.Dataset, config, tokenizer, *, batch: int,
                 cores: int) -> tf.data.Dataset:
  if mode == "decode":
    def decode(example):
      return image_lib.decode(datasets.get_numpy_field(example, config.data.image_key))
    ds = records.repeat().map(decode, num_parallel_calls=cores)
    ds = ds.map(lambda image: tf.shape(image))    # images differ in size: batch their shapes
    ds = ds.batch(batch)
  else:
    views = methods.get_method(MODE_METHODS[mode]).views
    ds = train_pipeline.host_batches(records.repeat().enumerate(), config, tokenizer,
                                     views=views, seed=0, host_batch_size=batch)
  return ds.prefetch(2).with_options(_options(cores))


def time_mode(ds: tf.data.Dataset, batch: int, seconds: float, warmup: int = 3
              ) -> tuple[float, float]:
  """(images/s, CPU microseconds per image) over whole batches for at least `seconds` (after
  `warmup` batches). CPU time is the whole process's, all threads: on a machine shared with
  other jobs it still says what an image costs, where images/s says what this run got."""
  iterator = iter(ds)
  for _ in range(warmup):
    next(iterator)
  n, start, cpu_start = 0, time.perf_counter(), time.process_time()
  while True:
    next(iterator)
    n += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds and n >= 3:
      return n * batch / elapsed, (time.process_time() - cpu_start) / (n * batch) * 1e6


def text_costs(records: tf.data.Dataset, config, tokenizer, *, batch: int,
               seconds: float) -> dict:
  """Microseconds per caption, on one core, of tokenization and of EDA (both in Python)."""
  captions = [datasets.get_numpy_field(e, config.data.text_key) for e in
              records.take(batch).as_numpy_iterator()]
  captions = [(c if isinstance(c, bytes) else c.reshape(-1)[0]).decode("utf-8", "replace")
              for c in captions]
  lexicon = eda.load_synonyms()
  lexicon.synonyms.cache_clear()

  def per_caption(fn) -> float:
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
      fn(n)
      n += 1
    return (time.perf_counter() - start) / (n * len(captions)) * 1e6

  length = config.model.text.context_length
  seeds = [random.Random(i).getrandbits(63) for i in range(len(captions))]
  return {"tokenize_us_per_caption": per_caption(lambda n: tokenizer.encode(captions, length)),
          "eda_us_per_caption": per_caption(
              lambda n: eda.augment_batch(captions, [s + n for s in seeds], lexicon))}


def run(config, tokenizer, *, records: int, batch: int, cores: int, seconds: float,
        modes=MODES) -> dict:
  unknown = set(modes) - {"decode", *MODE_METHODS}
  if unknown:
    raise ValueError(f"Unknown modes {sorted(unknown)}: choose from decode, "
                     f"{', '.join(MODE_METHODS)}.")
  config.data.num_parallel_calls = cores
  cached = cached_records(config, records)
  results = {"dataset": config.data.name, "records": records, "batch": batch, "cores": cores,
             "image_size": config.model.image.image_size, "modes": {}}
  for mode in modes:
    rate, cpu_us = time_mode(
        mode_dataset(mode, cached, config, tokenizer, batch=batch, cores=cores), batch, seconds)
    results["modes"][mode] = {"images_per_sec": rate, "images_per_sec_per_core": rate / cores,
                              "cpu_us_per_image": cpu_us}
  decode = results["modes"].get("decode")
  for mode, r in results["modes"].items():
    fraction = ""
    if decode:
      r["fraction_of_decode"] = r["images_per_sec"] / decode["images_per_sec"]
      r["cpu_fraction_of_decode"] = decode["cpu_us_per_image"] / r["cpu_us_per_image"]
      fraction = (f"{r['fraction_of_decode']:5.2f}x decode   (CPU: {r['cpu_us_per_image']:5.0f} "
                  f"us/image, {r['cpu_fraction_of_decode']:4.2f}x decode)")
    print(f"{mode:>10}: {r['images_per_sec']:9,.0f} images/s   "
          f"{r['images_per_sec_per_core']:8,.0f} images/s/core   {fraction}", flush=True)
  results["text"] = text_costs(cached, config, tokenizer, batch=batch,
                               seconds=max(seconds / 4, 0.1))
  for name, value in results["text"].items():
    print(f"{name:>24}: {value:8.1f}", flush=True)
  return results


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415
  f = flags.FLAGS
  config = config_lib.base_config()
  config.data.update(dict(name=f.dataset, data_dir=f.data_dir, split=f.split,
                          image_key=f.image_key, text_key=f.text_key,
                          builtin=f.dataset in datasets.EMBEDDED_DATASETS))
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
  if f.json:
    with open(f.json, "w", encoding="utf-8") as out:
      json.dump(results, out, indent=2)
  # Returns None: absl's app.run exits with main's return value, and anything else is "failed".


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
  flags.DEFINE_list("modes", list(MODES), f"Of decode, {', '.join(MODE_METHODS)}.")
  flags.DEFINE_string("json", "", "Also write the results here.")
  app.run(main)
