"""Training on a weighted mixture of TFDS datasets: config.data.mixture.

The spec is one string, so that it can be given on the command line like any other field:
comma-separated sources, each NAME[:VERSION]:WEIGHT, then optionally |FIELD=VALUE settings of
that source (split, image_key, text_key, data_dir: unset ones are config.data's; builtin:
unset, only the embedded datasets are built on first use):

  --config.data.mixture='xclip_demo:0.7,my_pairs:0.3|text_key=caption|data_dir=/data/tfds'

Weights are normalised to sum to 1. Which source each record of the stream comes from is a
stateless draw from (the process's seed, the record's position): position p belongs to chunk
p // CHUNK, whose CHUNK choices are one tf.random.stateless_categorical call seeded by the chunk.
So the sequence is fixed by the seed alone, and a run resumed at position `first` (the
train pipeline's start_step x block) counts each source's records before it by redrawing the
chunks (cheap, no data read), skips that many records of each source's own shuffled stream, and
continues with the batches an uninterrupted run reads. Each source keeps its own shuffle buffer
of config.data.shuffle_buffer encoded records and reads this process's slice of its split.

Per-source counters go into the batch STATS beside the global ones (train_pipeline.py):
source/<label>/records (read), source/<label>/examples (rows of the batches, repeats included)
and source/<label>/<reason> for each dropped-record reason; they add up to the global counters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from xclip_jax.data import datasets

CHUNK = 4096                # stream positions per stateless draw of sources
FIELDS = ("split", "image_key", "text_key", "data_dir", "builtin")
# The keys every source's records are mapped to before they are interleaved into one stream.
IMAGE, TEXT, SOURCE = "image", "text", "_source"


@dataclasses.dataclass(frozen=True)
class Source:
  name: str                 # TFDS name, optionally name:version
  weight: float             # normalised: the weights of a mixture sum to 1
  label: str                # the counters' name for it (the base name, made unique)
  split: str
  image_key: str
  text_key: str
  data_dir: str
  builtin: bool | None      # None: embedded datasets are built on first use, others must exist


def _bool(text: str, where: str) -> bool:
  if text.lower() in ("true", "1", "yes"):
    return True
  if text.lower() in ("false", "0", "no"):
    return False
  raise ValueError(f"{where}: builtin={text!r} is not a boolean (true or false).")


def parse(data_config) -> list[Source]:
  """The sources of config.data.mixture ([] when it is empty), checked."""
  spec = str(data_config.get("mixture", "") or "").strip()
  if not spec:
    return []
  where = f"config.data.mixture={spec!r}"
  fix = ("write NAME[:VERSION]:WEIGHT[|FIELD=VALUE...] per source, comma-separated, e.g. "
         "'cc3m:0.7,cc12m:0.3|text_key=caption'")
  sources, raw_weights = [], []
  for entry in spec.split(","):
    head, *settings = [part.strip() for part in entry.strip().split("|")]
    name, sep, weight = head.rpartition(":")
    try:
      weight = float(weight)
    except ValueError:
      weight = None
    if not sep or not name or weight is None:
      raise ValueError(f"{where}: {entry.strip()!r} has no weight; {fix}.")
    if not weight > 0 or not np.isfinite(weight):
      raise ValueError(f"{where}: the weight of {name!r} is {weight}; weights must be positive.")
    # builtin defaults to "embedded names only", whatever config.data.builtin says: a source
    # must never be downloaded and prepared because the primary dataset is the demo.
    fields = {f: None if f == "builtin" else data_config[f] for f in FIELDS}
    for setting in settings:
      key, sep, value = setting.partition("=")
      if not sep or key.strip() not in FIELDS:
        raise ValueError(f"{where}: {setting!r} is not FIELD=VALUE with FIELD one of {FIELDS}.")
      key, value = key.strip(), value.strip()
      fields[key] = _bool(value, where) if key == "builtin" else value
    sources.append(dict(name=name, **fields))
    raw_weights.append(weight)
  labels = []
  for source in sources:
    base = datasets._base_name(source["name"])  # noqa: SLF001
    label, n = base, 1
    while label in labels:
      n += 1
      label = f"{base}_{n}"
    labels.append(label)
  total = sum(raw_weights)
  return [Source(weight=w / total, label=label, **s)
          for s, w, label in zip(sources, raw_weights, labels)]


def prepare_sources(data_config) -> list[Source]:
  """Parses the mixture and checks (or, for embedded datasets, builds) every source's data:
  before anything compiles, with the message of a single dataset that is not prepared."""
  sources = parse(data_config)
  for source in sources:
    datasets.prepare_dataset(source.name, source.data_dir or None, source.builtin)
  return sources


def _derived_seed(seed: int, index: int) -> int:
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] >> 1)


class Selector:
  """Which source each stream position reads: a stateless draw per CHUNK positions."""

  def __init__(self, weights, seed: int):
    self.n = len(weights)
    self._logits = tf.math.log(tf.constant([list(weights)], tf.float32))
    self._seed = tf.constant(seed, tf.int64)

  def chunk(self, index) -> tf.Tensor:
    """int64 [CHUNK]: the sources of positions index * CHUNK ... (index + 1) * CHUNK - 1."""
    seed = tf.stack([self._seed, tf.cast(index, tf.int64)])
    return tf.random.stateless_categorical(self._logits, CHUNK, seed, dtype=tf.int64)[0]

  def _histogram(self, choices) -> tf.Tensor:
    return tf.math.bincount(tf.cast(choices, tf.int32), minlength=self.n, maxlength=self.n,
                            dtype=tf.int64)

  def counts_before(self, first: int) -> np.ndarray:
    """int64 [n]: how many of the positions 0 .. first - 1 each source supplies."""
    full, rest = divmod(int(first), CHUNK)
    total = np.zeros(self.n, np.int64)
    if full:
      chunks = tf.data.Dataset.range(full).map(lambda c: self._histogram(self.chunk(c)),
                                               num_parallel_calls=tf.data.AUTOTUNE)
      total += chunks.reduce(tf.zeros(self.n, tf.int64), lambda a, b: a + b).numpy()
    if rest:
      total += self._histogram(self.chunk(full)[:rest]).numpy()
    return total

  def dataset(self, first: int) -> tf.data.Dataset:
    """The sources of positions first, first + 1, ... (endless)."""
    full, rest = divmod(int(first), CHUNK)
    return (tf.data.Dataset.range(full, np.iinfo(np.int64).max).map(self.chunk)
            .unbatch().skip(rest))


def _field(example: dict, path: str, source: Source) -> tf.Tensor:
  value = example
  for part in path.split("/"):
    if not isinstance(value, dict) or part not in value:
      keys = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise KeyError(f"config.data.mixture source {source.name!r}: feature path {path!r} has no "
                     f"{part!r} among {keys}; set its key with |image_key=... or |text_key=....")
    value = value[part]
  return value


def _source_stream(source: Source, index: int, *, seed: int, skip: int, shuffle_buffer: int,
                   process_index: int, process_count: int) -> tf.data.Dataset:
  """Endless, shuffled, still-encoded records of one source as {IMAGE, TEXT (rank 1), SOURCE},
  the first `skip` of them dropped unread."""
  builder = datasets.prepare_dataset(source.name, source.data_dir or None, source.builtin)
  split = tfds.even_splits(source.split, n=process_count, drop_remainder=False)[process_index]
  options = datasets.tf_data_options()
  read_config = tfds.ReadConfig(shuffle_seed=seed, options=options)
  ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config,
                          decoders=datasets.read_only(
                              builder, source.image_key, source.text_key, fix=(
                                  f"config.data.mixture source {source.name!r}: set its key with"
                                  " |image_key=... or |text_key=...")))
  ds = ds.repeat().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).skip(skip)

  def common(example):
    # One layout for every source: the encoded image, the caption(s) as a list (one random
    # non-empty caption is drawn later, as for a single dataset), the source's index.
    text = tf.reshape(_field(example, source.text_key, source), [-1])
    return {IMAGE: _field(example, source.image_key, source), TEXT: text,
            SOURCE: tf.constant(index, tf.int64)}
  return ds.map(common)


def make_stream(config, *, seed: int, first: int, process_index: int,
                process_count: int) -> tuple[tf.data.Dataset, list[Source]]:
  """(position, record) pairs from position `first` on, drawn from the mixture's sources, and
  the sources. `seed` is this process's (datasets.process_seed)."""
  sources = parse(config.data)
  selector = Selector([s.weight for s in sources], _derived_seed(seed, 0))
  skips = selector.counts_before(first)
  streams = [_source_stream(s, i, seed=_derived_seed(seed, 1 + i), skip=int(skips[i]),
                            shuffle_buffer=config.data.shuffle_buffer,
                            process_index=process_index, process_count=process_count)
             for i, s in enumerate(sources)]
  ds = tf.data.Dataset.choose_from_datasets(streams, selector.dataset(first))
  return ds.enumerate(start=first), sources


def source_counters(labels, block_sources, decoded_sources, status, kept_sources,
                    reasons: dict[str, int]) -> dict[str, tf.Tensor]:
  """One block's per-source STATS: records read, rows kept (examples), dropped by reason.

  block_sources: the sources of all the block's records; decoded_sources and status: of those
  that survived decoding (the others are undecodable_image); kept_sources: of the batch's rows;
  reasons: {reason: status code} of the reasons a decoded record is dropped for.
  """
  n = len(labels)
  hist = lambda x: tf.math.bincount(tf.cast(x, tf.int32), minlength=n, maxlength=n,
                                    dtype=tf.int64)
  records, decoded, kept = hist(block_sources), hist(decoded_sources), hist(kept_sources)
  out = {}
  for i, label in enumerate(labels):
    out[f"source/{label}/records"] = records[i]
    out[f"source/{label}/examples"] = kept[i]
    out[f"source/{label}/undecodable_image"] = records[i] - decoded[i]
    for reason, code in reasons.items():
      hits = tf.logical_and(tf.equal(decoded_sources, i), tf.equal(status, code))
      out[f"source/{label}/{reason}"] = tf.reduce_sum(tf.cast(hits, tf.int64))
  return out
