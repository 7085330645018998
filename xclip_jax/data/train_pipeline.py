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
from absl import logging
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
# A record's status; _ABSENT pads a block's last chunk (no record there, nothing counted).
_OK, _EMPTY_CAPTION, _TOO_LARGE, _UNDECODABLE, _ABSENT = 0, 1, 2, 3, 4
# Records processed together (planned, decoded in one graph, resized in one call): large enough
# that the fixed costs per chunk vanish, small enough that the chunks in flight (one per
# tf.data thread) hold little memory.
CHUNK_RECORDS = 128
_RANDOM_STREAM = 0x63726f70           # separates these random words from other uses of the seed


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
                          decoders=datasets.read_only(builder, d.image_key, d.text_key))
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


def _unit(bits: np.ndarray) -> np.ndarray:
  """uint32 random words -> uniforms in [0, 1) with 24 bits, as torch's float32 uniform_."""
  return (bits >> 8).astype(np.float64) * 2.0**-24


class _RandomWords:
  """Where a record's random choices lie among its uint32 words: per image view 4 x ATTEMPTS
  window uniforms, one for the caption, two (an int64) per EDA view; padded to a multiple of 4
  (one Philox block per four words, so a record's words follow from its position alone)."""

  def __init__(self, plan: ViewPlan):
    self.n_views = len(plan.image_keys)
    self.caption = self.n_views * view_crops.UNIFORMS_PER_VIEW
    self.eda = self.caption + 1
    self.count = -(-(self.eda + 2 * len(plan.eda_keys)) // 4) * 4

  def uniforms(self, bits: np.ndarray) -> np.ndarray:
    """[B, count] words -> the crop windows' uniforms [B, V, 4, ATTEMPTS]."""
    return _unit(bits[:, :self.caption]).reshape(len(bits), self.n_views, 4, view_crops.ATTEMPTS)

  def eda_seeds(self, bits: np.ndarray) -> np.ndarray:
    words = bits[:, self.eda:self.count].astype(np.uint64)
    n = (self.count - self.eda) // 2 * 2
    return ((words[:, 0:n:2] << np.uint64(32) | words[:, 1:n:2]) >> np.uint64(1)).astype(np.int64)


class _ChunkPlanner:
  """numpy, once per chunk: each record's caption sampled among its non-empty ones, its status
  (an empty caption; a JPEG/PNG header above max_image_pixels, refused before decoding; an
  unreadable JPEG header), its crop windows and what to decode (view_crops.plan_decodes), and
  whether it must be decoded alone first (`probe`: a file that does not end as a whole one
  does, most often a truncated download)."""

  def __init__(self, plan: ViewPlan, words: _RandomWords, size: int, max_pixels: int):
    self.scales = np.asarray(plan.crop_scales, np.float64)
    self.words, self.size, self.max_pixels = words, size, max_pixels

  def __call__(self, positions, images, texts, valid, bits):
    n = len(images)
    status = np.full(n, _ABSENT, np.int32)
    heights, widths = np.ones(n, np.int64), np.ones(n, np.int64)
    is_jpeg, complete, probe = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    chosen = np.full(n, b"", object)
    caption_u = _unit(bits[:, self.words.caption])
    for i in np.flatnonzero(valid).tolist():
      captions = [t for t in texts[i].tolist() if t.strip()]
      if not captions:
        status[i] = _EMPTY_CAPTION
        continue
      chosen[i] = captions[min(int(caption_u[i] * len(captions)), len(captions) - 1)]
      data = images[i]
      fmt, height, width = image_lib.header_size(data)
      if fmt == "jpeg" and height < 0:
        logging.warning("Train record %d: unreadable JPEG header; dropped.", positions[i])
        status[i] = _UNDECODABLE
        continue
      if self.max_pixels and height > 0 and height * width > self.max_pixels:
        status[i] = _TOO_LARGE
        continue
      status[i] = _OK
      whole = image_lib.is_complete(data, fmt)
      is_jpeg[i], complete[i], probe[i] = fmt == "jpeg", whole, not whole
      if height > 0:
        heights[i], widths[i] = height, width
    kinds, windows, boxes = view_crops.plan_decodes(
        heights, widths, is_jpeg, complete, self.words.uniforms(bits), self.scales, self.size)
    return status, kinds, windows, boxes, probe, chosen, self.words.eda_seeds(bits)


def host_batches(ds: tf.data.Dataset, config, tokenizer, *, views: views_lib.Views, seed: int,
                 host_batch_size: int, sources: list[mixture.Source] | None = None
                 ) -> tf.data.Dataset:
  """(position, encoded example) pairs, positions consecutive -> make_train_dataset's batches.

  `sources`: the examples are a mixture's (mixture.make_stream: fixed keys, a source index),
  and the batches also count per source (its index travels through the chunks as a column).

  Each batch is built from the next block of host_batch_size + config.data.spare_records
  records: records that cannot be used (DROP_REASONS) are dropped and counted, the first
  host_batch_size usable ones are kept; if too few remain, usable rows of the block are repeated
  (counted as "duplicated"). A block with no usable record stops the run with an error: that
  is a wrong image_key/text_key or a broken dataset, not a few bad records. The examples'
  features must batch (make_train_dataset reads only the image and the text).

  A block is cut into chunks of at most CHUNK_RECORDS records, each processed as a whole (one
  numpy plan, one graph of decodes, one batched resize: no per-record tf.data stage). A decode that
  fails fails its chunk's loop; the chunk is then redone with each record decoded alone first
  (tf.data's ignore_errors drops the ones that fail, with a warning naming the error), which
  finds the same records every time: the batches stay a function of (seed, position).
  """
  d = config.data
  plan = ViewPlan.resolve(views, d)
  image_key, text_key = (mixture.IMAGE, mixture.TEXT) if sources else (d.image_key, d.text_key)
  size = config.model.image.image_size
  context_length = config.model.text.context_length
  block = host_batch_size + d.spare_records
  n_chunks = -(-block // CHUNK_RECORDS)
  chunk = -(-block // n_chunks)
  parallel = tf.data.AUTOTUNE if d.num_parallel_calls < 0 else d.num_parallel_calls
  lexicon = eda.load_synonyms() if plan.eda_keys else None
  words = _RandomWords(plan)
  planner = _ChunkPlanner(plan, words, size, d.max_image_pixels)
  scales = np.asarray(plan.crop_scales, np.float64)
  key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(
      seed=tf.constant([seed, _RANDOM_STREAM], tf.int64))

  def to_chunks(positions, example):
    images, texts = datasets.lookup(example, image_key), datasets.lookup(example, text_key)
    # One column per caption: a scalar caption is a list of one; lists are padded with "".
    texts = tf.reshape(texts, [block, tf.reduce_prod(tf.shape(texts)[1:])])
    pad = n_chunks * chunk - block
    return {"position": tf.reshape(positions[0] + tf.range(n_chunks * chunk, dtype=tf.int64),
                                   [n_chunks, chunk]),
            "image": tf.reshape(tf.pad(images, [[0, pad]]), [n_chunks, chunk]),
            "texts": tf.reshape(tf.pad(texts, [[0, pad], [0, 0]]), [n_chunks, chunk, -1]),
            "valid": tf.reshape(tf.range(n_chunks * chunk) < block, [n_chunks, chunk]),
            **({mixture.SOURCE: tf.reshape(tf.pad(example[mixture.SOURCE], [[0, pad]]),
                                           [n_chunks, chunk])} if sources else {})}

  def plan_chunk(c):
    # Philox block (position * count / 4 + j) holds words 4j..4j+3 of that record.
    start = tf.cast(c["position"][0], tf.uint64) * (words.count // 4)
    bits = tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=[chunk, words.count], key=key, counter=tf.stack([start, counter[1]]), alg=1,
        dtype=tf.uint32)
    specs = [(tf.int32, []), (tf.int32, []), (tf.int32, [4]), (tf.int32, [words.n_views, 4]),
             (tf.bool, []), (tf.string, []), (tf.int64, [len(plan.eda_keys)])]
    outs = tf.numpy_function(planner, [c["position"], c["image"], c["texts"], c["valid"], bits],
                             [dtype for dtype, _ in specs], stateful=False)
    for out, (_, shape) in zip(outs, specs):
      out.set_shape([chunk] + shape)
    names = ("status", "kinds", "windows", "boxes", "probe", "text", "eda_seeds")
    passed = {k: c[k] for k in ("image", mixture.SOURCE) if k in c}
    return dict(zip(names, outs), bits=bits, **passed)

  def resize(*args):
    decoded, (kinds, boxes, bits, status) = args[:chunk], args[chunk:]
    return view_crops.resize_views(decoded, kinds, boxes, words.uniforms(bits), scales,
                                   np.flatnonzero(status == _OK), size, d.antialias_above)

  def process_chunk(c):
    def rows_where(mask):
      return tf.cast(tf.reshape(tf.where(mask), [-1]), tf.int32)

    def as_mask(rows):
      return tf.scatter_nd(rows[:, None], tf.ones_like(rows, tf.bool), [chunk])

    def failed_of(rows):          # one element: which of `rows` do not decode on their own
      decoded = tf.data.Dataset.from_tensor_slices(rows).map(lambda r: (r, tf.size(
          view_crops.decode_one(c["image"][r], c["kinds"][r], c["windows"][r]))))
      ok = decoded.ignore_errors(log_warning=True).map(lambda r, _: r).batch(chunk)
      ok = ok.concatenate(tf.data.Dataset.from_tensors(tf.zeros([0], tf.int32))).take(1)
      return ok.map(lambda ok_rows: as_mask(rows) & ~as_mask(ok_rows))

    def finish(failed):
      status = tf.where(failed, _UNDECODABLE, c["status"])
      kinds = tf.where(status == _OK, c["kinds"], view_crops.SKIP)
      decoded = view_crops.decode_windows(c["image"], kinds, c["windows"])
      images = tf.numpy_function(resize, [*decoded, kinds, c["boxes"], c["bits"], status],
                                 [tf.uint8] * words.n_views, stateful=False)
      out = {"_text": c["text"], "_status": status}
      if sources:
        out[mixture.SOURCE] = c[mixture.SOURCE]
      for key, image in zip(plan.image_keys, images):
        out[key] = tf.ensure_shape(image, [chunk, size, size, 3])
      for i, key in enumerate(plan.eda_keys):
        out[f"_seed_{key}"] = c["eda_seeds"][:, i]
      return out

    usable = c["status"] == _OK
    first = failed_of(rows_where(c["probe"] & usable)).map(finish)
    redo = failed_of(rows_where(usable)).map(finish)
    return first.ignore_errors(log_warning=False).concatenate(redo).take(1)

  def select(rows):
    rows = {k: tf.reshape(v, [n_chunks * chunk] + v.shape.as_list()[2:]) for k, v in rows.items()}
    status = rows.pop("_status")
    usable = tf.reshape(tf.where(tf.equal(status, _OK)), [-1])
    count = tf.size(usable, out_type=tf.int64)
    check = tf.debugging.assert_positive(
        count, message=f"None of {block} consecutive records could be used (undecodable images "
        f"or empty captions): check config.data.image_key={d.image_key!r} and text_key="
        f"{d.text_key!r}, and the dataset (the tf.data warnings above name the errors).")
    with tf.control_dependencies([check]):
      pick = tf.gather(usable, tf.range(host_batch_size, dtype=tf.int64) % count)
    # Usually the first host_batch_size records are all usable: a slice, not a copy.
    prefix = tf.reduce_all(tf.equal(status[:host_batch_size], _OK))
    out = tf.cond(prefix, lambda: {k: v[:host_batch_size] for k, v in rows.items()},
                  lambda: {k: tf.gather(v, pick) for k, v in rows.items()})
    counted = lambda reason: tf.reduce_sum(tf.cast(status == reason, tf.int64))  # noqa: E731
    out[STATS_KEY] = {
        "records": tf.constant(block, tf.int64),
        "undecodable_image": counted(_UNDECODABLE),
        "empty_caption": counted(_EMPTY_CAPTION),
        "too_large_image": counted(_TOO_LARGE),
        "duplicated": tf.maximum(host_batch_size - count, 0)}
    if sources:     # the block's records (not the padding), those decoded, the batch's rows
      read = status != _ABSENT
      decoded = read & (status != _UNDECODABLE)
      out[STATS_KEY].update(mixture.source_counters(
          [s.label for s in sources], tf.boolean_mask(rows[mixture.SOURCE], read),
          tf.boolean_mask(rows[mixture.SOURCE], decoded), tf.boolean_mask(status, decoded),
          out.pop(mixture.SOURCE), {"empty_caption": _EMPTY_CAPTION,
                                    "too_large_image": _TOO_LARGE}))
    for k, v in out.items():
      if k != STATS_KEY:
        v.set_shape([host_batch_size] + v.shape.as_list()[1:])
    return out

  ds = ds.padded_batch(block, drop_remainder=True).map(to_chunks).unbatch()
  ds = ds.map(plan_chunk, num_parallel_calls=parallel, deterministic=True)
  ds = ds.interleave(process_chunk, cycle_length=parallel, block_length=1,
                     num_parallel_calls=parallel, deterministic=True)
  if n_chunks == 1:      # a block of one chunk: no batch, which would copy every pixel
    ds = ds.map(lambda rows: tf.nest.map_structure(lambda v: v[None], rows))
  else:
    ds = ds.batch(n_chunks)
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
