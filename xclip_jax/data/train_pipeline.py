"""The train pipeline: TFDS -> this process's slice -> the method's declared views, uint8 + ids.

The host does only what needs the encoded bytes: per record ONE decode of the window the views'
crops need, a crop per declared ImageView resized to the model size, uint8 (data/view_crops.py);
the caption sampled, and for a TextView with eda=True its EDA variant (data/eda.py); then per batch
one SentencePiece call per text view. Flip, colour jitter, grayscale, blur and normalisation are
per-pixel arithmetic and happen on the accelerator, in the jitted train step.

Records stay encoded through the shuffle buffer (small buffer memory). Every random choice (file
order, shuffle, crops, which caption, EDA) derives from config.seed folded with the process index
and the record's position in the stream, so a run is reproducible, a resumed run continues
bitwise, and processes read disjoint slices with different randomness.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from xclip_jax.data import eda
from xclip_jax.data import image as image_lib
from xclip_jax.data import datasets
from xclip_jax.data import mixture
from xclip_jax.data import view_crops
from xclip_jax.data import views as views_lib
from xclip_jax.data.global_batches import STATS_KEY

# Train batches carry per-batch counters under STATS_KEY (host side only: GlobalBatchIterator
# sums them instead of making them device arrays). Records dropped from a batch, by reason:
#   undecodable_image  TF could not decode (corrupt, truncated, unknown format) or crop it
#   empty_caption      no non-empty caption
#   too_large_image    a JPEG/PNG header says more than config.data.max_image_pixels pixels
# and, for the rows kept: duplicated (a slot refilled with another row of the same batch, when
# more records were dropped than config.data.spare_records), caption_truncated (cut at the
# context length), caption_not_utf8 (invalid bytes replaced by U+FFFD), records (read).
DROP_REASONS = ("undecodable_image", "empty_caption", "too_large_image")
_OK, _EMPTY_CAPTION, _TOO_LARGE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ViewPlan:
  """A method's declared views resolved against config.data, once, for the host pipeline."""
  image_keys: tuple[str, ...]
  crop_scales: tuple[tuple[float, float], ...]     # per image view: its RandomResizedCrop area
  text_keys: tuple[str, ...]                       # the caption as sampled
  eda_keys: tuple[str, ...]                        # the caption after one EDA op, each its own

  @classmethod
  def resolve(cls, views: views_lib.Views, data_config) -> "ViewPlan":
    return cls(image_keys=tuple(v.key for v in views.image),
               crop_scales=tuple(v.crop_scale(data_config) for v in views.image),
               text_keys=tuple(v.key for v in views.text if not v.eda),
               eda_keys=tuple(v.key for v in views.text if v.eda))


def make_train_dataset(config, tokenizer, *, views: views_lib.Views, process_index: int,
                       process_count: int, host_batch_size: int, seed: int | None = None,
                       start_step: int = 0) -> tf.data.Dataset:
  """Endless host batches of this process's slice: what `views` declares, and the counters.

  Per ImageView key uint8 [b, S, S, 3] (S = config.model.image.image_size; not flipped, not
  normalised), per TextView key int32 [b, L], and STATS_KEY (see DROP_REASONS).
  `seed` (default config.seed) fixes every random choice. `start_step` resumes the stream exactly
  where an uninterrupted run would be at that step: the shuffled, still-encoded records of the
  steps before are read and dropped (no decoding; about a second per 100k records), and each
  example keeps its position-derived seeds. A resumed run that does not need exact replay can
  instead pass a new `seed` and start_step=0 (config.data.exact_resume=False).
  """
  d = config.data
  seed = datasets.process_seed(config.seed if seed is None else seed, process_index)
  if d.get("mixture"):       # several datasets, weighted (data/mixture.py)
    ds, sources = mixture.make_stream(config, seed=seed, first=start_step * (
        host_batch_size + d.spare_records), process_index=process_index,
        process_count=process_count)
    return host_batches(ds, config, tokenizer, views=views, seed=seed,
                        host_batch_size=host_batch_size, sources=sources)
  builder = datasets.prepare_dataset(d.name, d.data_dir, d.builtin)
  split = tfds.even_splits(d.split, n=process_count, drop_remainder=False)[process_index]
  options = datasets.tf_data_options()
  read_config = tfds.ReadConfig(shuffle_seed=seed, options=options)
  ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config,
                          decoders=datasets.skip_decoding(d.image_key))
  # Shuffle encoded records (a few KB each), then decode: the buffer stays small.
  ds = ds.repeat().shuffle(d.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  # Every step reads a fixed block of records (batch + spares), dropped ones included, so the
  # records before `start_step` are known without decoding them.
  first = start_step * (host_batch_size + d.spare_records)
  ds = ds.skip(first).enumerate(start=first)
  return host_batches(ds, config, tokenizer, views=views, seed=seed,
                      host_batch_size=host_batch_size)


def _texts_of(raw: np.ndarray) -> tuple[list[str], int]:
  texts, invalid = [], 0
  for t in raw.tolist():
    try:
      texts.append(t.decode("utf-8"))
    except UnicodeDecodeError:
      texts.append(t.decode("utf-8", errors="replace"))
      invalid += 1
  return texts, invalid


def host_batches(ds: tf.data.Dataset, config, tokenizer, *, views: views_lib.Views, seed: int,
                 host_batch_size: int, sources: list[mixture.Source] | None = None
                 ) -> tf.data.Dataset:
  """(position, encoded example) pairs -> the train batches of make_train_dataset.

  `sources`: the examples are a mixture's (mixture.make_stream: fixed keys, a source index),
  and the batches also count per source.

  Each batch is built from the next block of host_batch_size + config.data.spare_records
  records: records that cannot be used (DROP_REASONS) are dropped and counted, the first
  host_batch_size usable ones are kept; if too few remain, usable rows of the block are repeated
  (counted as "duplicated"). A block with no usable record stops the run with an error: that
  is a wrong image_key/text_key or a broken dataset, not a few bad records.
  """
  d = config.data
  plan = ViewPlan.resolve(views, d)
  image_key, text_key = (mixture.IMAGE, mixture.TEXT) if sources else (d.image_key, d.text_key)
  size = config.model.image.image_size
  context_length = config.model.text.context_length
  block = host_batch_size + d.spare_records
  parallel = tf.data.AUTOTUNE if d.num_parallel_calls < 0 else d.num_parallel_calls
  base_seed = tf.constant(seed, tf.int64)
  lexicon = eda.load_synonyms() if plan.eda_keys else None
  n_seeds = 1 + len(plan.eda_keys) + len(plan.image_keys)

  def preprocess(index, example):
    # Per-example stateless seeds from (process seed, position in the stream): reproducible.
    seeds = tf.unstack(tf.random.experimental.stateless_split(tf.stack([base_seed, index]),
                                                              n_seeds))
    n_eda = len(plan.eda_keys)
    text_seed, eda_seeds, image_seeds = seeds[0], seeds[1:1 + n_eda], seeds[1 + n_eda:]
    image_bytes = datasets.get_numpy_field(example, image_key)
    text = datasets.get_caption(example, text_key, text_seed)
    status = tf.where(tf.strings.length(tf.strings.strip(text)) == 0, _EMPTY_CAPTION, _OK)
    if d.max_image_pixels:
      too_large = image_lib.encoded_pixels(image_bytes) > d.max_image_pixels
      status = tf.where(tf.logical_and(status == _OK, too_large), _TOO_LARGE, status)
    # A record already known to be dropped decodes a 1x1 stand-in instead (never a bomb).
    image_bytes = tf.where(status == _OK, image_bytes, image_lib.TINY_JPEG)
    crops = view_crops.decode_views(image_bytes, image_seeds, plan.crop_scales, size,
                                    antialias_above=d.antialias_above)
    out = dict(zip(plan.image_keys, crops))
    out.update({"_text": text, "_status": status})
    if sources:
      out[mixture.SOURCE] = example[mixture.SOURCE]
    for key, eda_seed in zip(plan.eda_keys, eda_seeds):
      out[f"_seed_{key}"] = eda_seed[0]
    return out

  def preprocess_block(*window):
    # A failing decode raises inside tf.data; ignore_errors drops that record only. The empty
    # batch appended (then take(1)) keeps one output per block even if every record failed.
    records = tf.data.Dataset.zip(window).map(preprocess, num_parallel_calls=parallel,
                                              deterministic=True)
    records = records.ignore_errors(log_warning=True)
    empty = tf.nest.map_structure(lambda spec: tf.zeros([0] + spec.shape.as_list(), spec.dtype),
                                  records.element_spec)
    batch = records.batch(block).concatenate(tf.data.Dataset.from_tensors(empty)).take(1)
    if not sources:
      return batch
    # The sources of every record of the block, the undecodable ones included.
    block_sources = tf.data.Dataset.zip(window).map(lambda _, ex: ex[mixture.SOURCE]).batch(block)
    return tf.data.Dataset.zip(batch, block_sources).map(
        lambda rows, s: dict(rows, _block_sources=s))

  def select(rows):
    status = rows.pop("_status")
    block_sources = rows.pop("_block_sources", None)
    decoded = tf.shape(status, out_type=tf.int64)[0]
    usable = tf.reshape(tf.where(tf.equal(status, _OK)), [-1])
    count = tf.size(usable, out_type=tf.int64)
    check = tf.debugging.assert_positive(
        count, message=f"None of {block} consecutive records could be used (undecodable images "
        f"or empty captions): check config.data.image_key={d.image_key!r} and text_key="
        f"{d.text_key!r}, and the dataset (the tf.data warnings above name the errors).")
    with tf.control_dependencies([check]):
      pick = tf.gather(usable, tf.range(host_batch_size, dtype=tf.int64) % count)
    # Usually the first host_batch_size records are all usable: a slice, not a copy.
    prefix = tf.logical_and(decoded >= host_batch_size,
                            tf.reduce_all(tf.equal(status[:host_batch_size], _OK)))
    out = tf.cond(prefix, lambda: {k: v[:host_batch_size] for k, v in rows.items()},
                  lambda: {k: tf.gather(v, pick) for k, v in rows.items()})
    out[STATS_KEY] = {
        "records": tf.constant(block, tf.int64),
        "undecodable_image": block - decoded,
        "empty_caption": tf.reduce_sum(tf.cast(status == _EMPTY_CAPTION, tf.int64)),
        "too_large_image": tf.reduce_sum(tf.cast(status == _TOO_LARGE, tf.int64)),
        "duplicated": tf.maximum(host_batch_size - count, 0)}
    if sources:
      out[STATS_KEY].update(mixture.source_counters(
          [s.label for s in sources], block_sources, rows[mixture.SOURCE], status,
          out.pop(mixture.SOURCE), {"empty_caption": _EMPTY_CAPTION,
                                    "too_large_image": _TOO_LARGE}))
    for k, v in out.items():
      if k != STATS_KEY:
        v.set_shape([host_batch_size] + v.shape.as_list()[1:])
    return out

  ds = ds.window(block, drop_remainder=True)
  ds = ds.interleave(preprocess_block, cycle_length=2, block_length=1, num_parallel_calls=2,
                     deterministic=True)
  ds = ds.map(select, num_parallel_calls=parallel)

  # ---- text: one SentencePiece call per batch per text view -----------------------------------
  def tokenize(raw: np.ndarray):
    texts, invalid = _texts_of(raw)
    ids, truncated = tokenizer.encode(texts, context_length, return_truncated=True)
    return ids, np.array([truncated, invalid], np.int64)

  def tokenize_eda(raw: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    captions = eda.augment_batch(_texts_of(raw)[0], seeds.tolist(), lexicon)
    return tokenizer.encode(captions, context_length)

  def tokenize_batch(batch):
    out = {k: batch[k] for k in plan.image_keys}
    ids, counts = tf.numpy_function(tokenize, [batch["_text"]], (tf.int32, tf.int64),
                                    stateful=False)
    ids.set_shape([host_batch_size, context_length])
    out.update({k: ids for k in plan.text_keys})
    out[STATS_KEY] = dict(batch[STATS_KEY], caption_truncated=counts[0],
                          caption_not_utf8=counts[1])
    for key in plan.eda_keys:
      out[key] = tf.numpy_function(tokenize_eda, [batch["_text"], batch[f"_seed_{key}"]],
                                   tf.int32, stateful=False)
      out[key].set_shape([host_batch_size, context_length])
    return out

  ds = ds.map(tokenize_batch, num_parallel_calls=parallel)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(datasets.tf_data_options())
