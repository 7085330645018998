"""Data mixtures (config.data.mixture, data/mixture.py): the spec, the stateless choice of
sources (proportions, determinism, resume arithmetic), and the train pipeline on a mixture of
three TFDS datasets with their own keys, splits and data_dirs: counters per source that add up,
same seed same batches, resume at step k = the straight run's batches from k."""

import numpy as np
import pytest

from xclip_jax import config as cfglib
from xclip_jax.data import datasets, global_batches, mixture, train_pipeline
from xclip_jax.data import tokenizer as toklib
from xclip_jax.data import views as views_lib

from tests.test_data_bad_records import _png, _write

HOST_BATCH, SPARE = 8, 2
BLOCK = HOST_BATCH + SPARE


def _data(**fields):
  c = cfglib.base_config()
  c.data.update(fields)
  return c.data


def test_spec_parsing_normalises_weights_and_applies_each_sources_settings():
  spec = (" cc3m:3, laion/400m:1.0.0:1|text_key=caption|split=train[:90%] ,"
          "cc3m:4|data_dir=/other|builtin=false")
  a, b, c = mixture.parse(_data(split="train", text_key="captions/text", data_dir="/d",
                                mixture=spec))
  assert (a.name, a.weight, a.label, a.split, a.text_key, a.data_dir, a.builtin) == (
      "cc3m", 0.375, "cc3m", "train", "captions/text", "/d", None)
  assert (b.name, b.weight, b.label, b.split, b.text_key) == (
      "laion/400m:1.0.0", 0.125, "laion", "train[:90%]", "caption")
  assert (c.weight, c.label, c.data_dir, c.builtin) == (0.5, "cc3m_2", "/other", False)
  assert mixture.parse(_data()) == []
  for bad, match in (("cc3m", "has no weight"), ("cc3m:0", "must be positive"),
                     ("cc3m:x", "has no weight"), ("cc3m:1|shuffle=3", "FIELD=VALUE"),
                     ("cc3m:1|builtin=maybe", "not a boolean")):
    with pytest.raises(ValueError, match=match):
      mixture.parse(_data(mixture=bad))


def _binomial_ok(count, n, p, sigmas=4.5):
  return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_selector_proportions_determinism_and_resume_counts():
  weights = (0.7, 0.2, 0.1)
  selector = mixture.Selector(weights, seed=123)
  n = 8 * mixture.CHUNK
  choices = np.array(list(selector.dataset(0).take(n).as_numpy_iterator()))
  counts = np.bincount(choices, minlength=3)
  for count, p in zip(counts, weights):
    assert _binomial_ok(count, n, p), (counts, weights)
  # Consecutive draws are not one source in runs (a per-position choice, not blocks).
  assert (choices[1:] != choices[:-1]).mean() > 0.4
  # The same seed gives the same sequence; another seed another.
  again = np.array(list(mixture.Selector(weights, seed=123).dataset(0).take(n)
                        .as_numpy_iterator()))
  other = np.array(list(mixture.Selector(weights, seed=124).dataset(0).take(n)
                        .as_numpy_iterator()))
  np.testing.assert_array_equal(choices, again)
  assert (choices != other).mean() > 0.3
  # Resuming at any position: its counts are the straight sequence's, its tail the same tail.
  for first in (0, 5, mixture.CHUNK, 2 * mixture.CHUNK + 123):
    np.testing.assert_array_equal(selector.counts_before(first),
                                  np.bincount(choices[:first], minlength=3))
    tail = np.array(list(selector.dataset(first).take(300).as_numpy_iterator()))
    np.testing.assert_array_equal(tail, choices[first:first + 300])


# Source "alpha": 40 good records. Source "beta" (its own data_dir, split "train[:30]"): 30
# records of which 3 undecodable and 2 with empty captions. Source "xclip_demo": the demo data,
# its captions under captions/text (a list), its images 64 px JPEGs.
BETA_BAD = {2: "image", 11: "caption", 17: "image", 23: "caption", 28: "image"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, demo_dir):
  alpha_dir, beta_dir = (str(tmp_path_factory.mktemp(n)) for n in ("alpha", "beta"))
  _write(alpha_dir, "alpha", [(_png(24, 20, i), f"alpha {i}") for i in range(40)])
  beta = []
  for i in range(36):
    bad = BETA_BAD.get(i)
    beta.append((b"not an image" if bad == "image" else _png(20, 24, 100 + i),
                 "" if bad == "caption" else f"beta {i}"))
  _write(beta_dir, "beta", beta)
  words = [f"alpha {i}" for i in range(40)] + [f"beta {i}" for i in range(36)]
  tokenizer = toklib.Tokenizer(model_proto=toklib.train_tokenizer(
      words + ["a red circle on the left, a blue square"] * 4, 96))
  spec = (f"alpha:0.5,beta:0.3|data_dir={beta_dir}|split=train[:30],"
          f"xclip_demo:0.2|data_dir={demo_dir}|text_key=captions/text")
  return alpha_dir, spec, tokenizer


def _config(sources, **data):
  alpha_dir, spec, _ = sources
  c = cfglib.base_config()
  cfglib.apply_demo(c)
  c.data.update(dict(name="alpha", data_dir=alpha_dir, builtin=False, text_key="caption",
                     mixture=spec, shuffle_buffer=16, spare_records=SPARE,
                     crop_scale=(1.0, 1.0), flip=False))
  c.data.update(data)
  return c


def _batches(config, tokenizer, n, **kw):
  ds = train_pipeline.make_train_dataset(config, tokenizer, views=views_lib.SINGLE, process_index=0,
                                   process_count=1, host_batch_size=HOST_BATCH, **kw)
  return list(ds.take(n).as_numpy_iterator())


def _source_of(caption):
  return "alpha" if caption.startswith("alpha") else "beta" if caption.startswith("beta") else (
      "xclip_demo")


def test_pipeline_counts_per_source_and_matches_the_selector(sources):
  _, _, tokenizer = sources
  config = _config(sources)
  n_batches = 30
  batches = _batches(config, tokenizer, n_batches)
  labels = ("alpha", "beta", "xclip_demo")
  total = lambda k: sum(int(b[global_batches.STATS_KEY][k]) for b in batches)

  # Records per source are exactly the selector's draws over the 30 blocks of 10 positions.
  selector = mixture.Selector((0.5, 0.3, 0.2), mixture._derived_seed(  # noqa: SLF001
      datasets.process_seed(config.seed, 0), 0))
  expected = selector.counts_before(n_batches * BLOCK)
  assert [total(f"source/{s}/records") for s in labels] == list(expected)
  for label, count, p in zip(labels, expected, (0.5, 0.3, 0.2)):
    assert _binomial_ok(count, n_batches * BLOCK, p), (label, count)

  # Per-source counters add up to the global ones, block by block.
  for b in batches:
    stats = b[global_batches.STATS_KEY]
    for key, whole in (("records", BLOCK), ("examples", HOST_BATCH)):
      assert sum(int(stats[f"source/{s}/{key}"]) for s in labels) == whole
    for reason in ("undecodable_image", "empty_caption", "too_large_image"):
      assert sum(int(stats[f"source/{s}/{reason}"]) for s in labels) == int(stats[reason])
  # Only beta has bad records; beta's drawn records hit them (30 of its records, 5 bad, are
  # read about 3 times), and the rows' captions say which source each came from.
  assert total("source/beta/undecodable_image") + total("source/beta/empty_caption") > 0
  for s in ("alpha", "xclip_demo"):
    assert total(f"source/{s}/undecodable_image") == total(f"source/{s}/empty_caption") == 0
  for b in batches:
    rows = [_source_of(t) for t in tokenizer.decode(b["text"])]
    for s in labels:
      assert rows.count(s) == int(b[global_batches.STATS_KEY][f"source/{s}/examples"])
    # beta's split is train[:30]: record ids 30..35 are never read.
    assert not any(t.startswith("beta 3") and len(t) == 7 for t in tokenizer.decode(b["text"]))


def test_same_seed_same_batches_and_resume_at_step_k(sources):
  _, _, tokenizer = sources
  config = _config(sources)
  straight = _batches(config, tokenizer, 10)
  again = _batches(config, tokenizer, 10)
  for a, b in zip(straight, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"], b["text"])
  other = _batches(_config(sources), tokenizer, 10, seed=1)
  assert not all(np.array_equal(a["text"], b["text"]) for a, b in zip(straight, other))
  for k in (3, 7):
    resumed = _batches(config, tokenizer, 10 - k, start_step=k)
    for a, b in zip(straight[k:], resumed, strict=True):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["text"], b["text"])
      assert a[global_batches.STATS_KEY] == b[global_batches.STATS_KEY]


def test_chunked_blocks_carry_each_records_source_and_count_it_alike(sources, monkeypatch):
  """The source index travels through the host pipeline's chunks as a column: blocks cut into
  chunks (the last one padded) give the same rows and the same per-source counters."""
  _, _, tokenizer = sources
  config = _config(sources)
  whole = _batches(config, tokenizer, 10)
  monkeypatch.setattr(train_pipeline, "CHUNK_RECORDS", 3)  # blocks of 10: 4 chunks, 2 padded
  chunked = _batches(config, tokenizer, 10)
  for a, b in zip(whole, chunked, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"], b["text"])
    assert a[global_batches.STATS_KEY] == b[global_batches.STATS_KEY]
    assert sum(int(b[global_batches.STATS_KEY][f"source/{s}/records"])
               for s in ("alpha", "beta", "xclip_demo")) == BLOCK     # padding not counted
  bad = sum(int(b[global_batches.STATS_KEY][f"source/beta/{r}"]) for b in chunked
            for r in ("undecodable_image", "empty_caption"))
  assert bad > 0


def test_a_wrong_source_key_names_the_source_and_the_fix(sources):
  _, spec, tokenizer = sources
  config = _config(sources, mixture=spec.replace("captions/text", "caption"))
  with pytest.raises(KeyError, match="source 'xclip_demo'.*text_key"):
    _batches(config, tokenizer, 1)


@pytest.mark.slow
def test_train_logs_the_per_source_counters(sources, demo_dir, tmp_path):
  from xclip_jax import train  # noqa: PLC0415
  from tests.tiny import tiny_config  # noqa: PLC0415
  alpha_dir, _, _ = sources
  config = tiny_config(demo_dir, total_steps=2, **{
      "evals.zeroshot.enabled": False, "evals.retrieval.enabled": False,
      "data.mixture": f"xclip_demo:0.5,alpha:0.5|data_dir={alpha_dir}|text_key=caption"})
  metrics = train.run(config, str(tmp_path / "run"))
  per_source = [metrics[f"data/source/{s}/records"] for s in ("xclip_demo", "alpha")]
  assert sum(per_source) == metrics["data/records"] == 2 * 16 and min(per_source) > 0
  assert sum(metrics[f"data/source/{s}/examples"] for s in ("xclip_demo", "alpha")) == 32
