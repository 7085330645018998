"""Retrieval recall, linear probe, feature gathering with padding, the evaluators on TFDS mock
data and on the demo dataset, and the standalone `python -m xclip_jax.evaluate`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from xclip_jax import methods, train
from xclip_jax.evaluate import features, linear_probe, retrieval, runner, templates, zeroshot
from xclip_jax.parallel import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---- retrieval ----------------------------------------------------------------------------------


def test_recall_hand_computed():
  # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2.
  image = np.eye(3, dtype=np.float32)
  text = np.array([[0.1, 0.9, 0], [0.8, 0, 0.6], [0, 1, 0], [0.9, 0, 0.1]], np.float32)
  caption_image = np.array([0, 0, 1, 2])
  r = retrieval.recall_at_k(image, text, caption_image, ks=(1, 2))
  # i2t: image 0's captions score 0.1, 0.8; best other caption scores 0.9 -> rank 1.
  #      image 1: own caption 1.0 -> rank 0. image 2: own 0.1; others 0.6 -> rank 1.
  assert r["i2t_r1"] == pytest.approx(100 / 3) and r["i2t_r2"] == 100
  # t2i: caption 0 -> image 1 best (0.9 > 0.1): rank 1; caption 1: rank 0; caption 2: rank 0;
  #      caption 3 (0.9, 0, 0.1): image 2 scores 0.1, image 0 0.9 -> rank 1.
  assert r["t2i_r1"] == 50 and r["t2i_r2"] == 100


def test_recall_perfect_is_100_and_random_is_chance():
  rng = np.random.default_rng(0)
  image = _unit(rng.normal(size=(200, 32)))
  caption_image = np.repeat(np.arange(200), 5)
  perfect = retrieval.recall_at_k(image, image[caption_image], caption_image)
  assert all(v == 100 for v in perfect.values())
  rand = retrieval.recall_at_k(image, _unit(rng.normal(size=(1000, 32))), caption_image)
  # t2i chance R@k = k / 200; i2t chance = 1 - C(995, k) / C(1000, k) ~ 5k / 1000.
  for k in (1, 5, 10):
    assert abs(rand[f"t2i_r{k}"] - 100 * k / 200) < 2.5
    assert abs(rand[f"i2t_r{k}"] - 100 * (1 - np.prod([(995 - i) / (1000 - i) for i in range(k)]))) < 6


# ---- linear probe -------------------------------------------------------------------------------


def test_linear_probe_separable_is_perfect_and_random_labels_are_chance():
  rng = np.random.default_rng(1)
  centres = 4 * rng.normal(size=(4, 8))
  labels = rng.integers(0, 4, 800)
  feats = centres[labels] + rng.normal(size=(800, 8))
  split = lambda a: (a[:500], a[500:600], a[600:])
  (xtr, xva, xte), (ytr, yva, yte) = split(feats), split(labels)
  good = linear_probe.linear_probe((xtr, ytr), (xva, yva), (xte, yte), 4,
                                   l2_grid=(1e-4, 1e-2, 1.0), steps=100)
  assert good["top1"] == 100.0
  shuffled = rng.permutation(labels)
  (str_, sva, ste) = split(shuffled)
  bad = linear_probe.linear_probe((xtr, str_), (xva, sva), (xte, ste), 4, l2_grid=(1e-2, 1.0),
                                  steps=100)
  assert abs(bad["top1"] - 25) < 12


def test_logistic_regression_matches_the_optimum_gradient():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(100, 5)).astype(np.float32), rng.integers(0, 3, 100)
  w, b = linear_probe.fit_logistic_regression(x, y, 3, l2=0.1, steps=200)
  # At the optimum the gradient of mean CE + 0.05 ||W||^2 vanishes.
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(100), y] -= 1
  np.testing.assert_allclose(x.T @ p / 100 + 0.1 * w, 0, atol=1e-4)
  np.testing.assert_allclose(p.mean(0), 0, atol=1e-4)


# ---- feature gathering --------------------------------------------------------------------------


def test_padded_rows_are_dropped_from_gathered_features():
  from configs import clip as clip_config
  c = clip_config.get_config("demo")
  c.model.update(dict(embed_dim=8))
  c.model.image.update(dict(width=16, layers=1, heads=2, patch_size=16))
  c.model.text.update(dict(width=16, layers=1, heads=2))
  mesh = mesh_lib.make_mesh(dict(data=8))
  graphdef, params, rest = mesh_lib.create_sharded(
      lambda: methods.build_model(c, eos_id=2, seed=0), mesh)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
  mask = np.array([True] * 13 + [False] * 3)
  batches = [{"image": images[:8], "label": np.arange(8), "index": np.arange(8),
              "mask": mask[:8]},
             {"image": images[8:], "label": np.arange(8, 16), "index": np.arange(8, 16),
              "mask": mask[8:]}]
  out = features.image_embeddings(iter(batches), mesh, graphdef, params, rest)
  np.testing.assert_array_equal(out["index"], np.arange(13))
  model = methods.build_model(c, eos_id=2, seed=0)
  np.testing.assert_allclose(out["emb"], model.encode_image(images[:13]), atol=1e-5)
  texts = features.text_embeddings(np.tile(np.array([[5, 6, 2] + [0] * 29], np.int32), (11, 1)),
                                   8, mesh, graphdef, params, rest)
  assert texts.shape == (11, 8)
  np.testing.assert_allclose(texts, np.tile(texts[:1], (11, 1)), atol=1e-6)


def test_clip80_templates():
  assert len(templates.CLIP80) == len(set(templates.CLIP80)) == 80
  assert all(t.count("{}") == 1 for t in templates.CLIP80 + templates.SHORT)


# ---- evaluators on real TFDS plumbing -----------------------------------------------------------


def _tiny_train_config(data_dir):
  from tests.tiny import tiny_config
  c = tiny_config(data_dir, total_steps=2, **{"checkpoint.every": 2})
  c.evals.retrieval.update(dict(enabled=True, max_examples=40, batch_size=16))
  c.evals.zeroshot.update(dict(max_examples=40, batch_size=16))
  return c


@pytest.mark.slow
def test_standalone_evaluate_reproduces_in_loop_results(demo_dir, tmp_path):
  workdir = str(tmp_path / "run")
  in_loop = train.run(_tiny_train_config(demo_dir), workdir)
  assert in_loop["retrieval/images"] == 40 and in_loop["retrieval/captions"] == 120
  out = subprocess.run(
      [sys.executable, "-m", "xclip_jax.evaluate", f"--workdir={workdir}",
       "--config.evals.linear_probe.enabled=True", "--config.evals.linear_probe.max_examples=64",
       "--config.evals.linear_probe.steps=20", f"--config.evals.linear_probe.data_dir={demo_dir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.load(open(os.path.join(workdir, "eval", "step_2.json")))
  assert results["step"] == 2
  for key in ("zeroshot/top1", "zeroshot/top5", "retrieval/i2t_r1", "retrieval/t2i_r10"):
    assert results[key] == pytest.approx(in_loop[key]), key
  assert results["linear_probe/train_examples"] == 64
  # The CLI's linear probe equals the same evaluator run here on the restored checkpoint.
  from xclip_jax import checkpoint
  from xclip_jax.data import tokenizer as tokenizer_lib
  config = checkpoint.saved_config(workdir)
  config.evals.zeroshot.enabled = config.evals.retrieval.enabled = False
  config.evals.linear_probe.update(dict(enabled=True, max_examples=64, steps=20,
                                        data_dir=demo_dir))
  mesh = mesh_lib.make_mesh(dict(data=8))
  tok = tokenizer_lib.resolve_tokenizer(config)
  graphdef, abstract_params, abstract_rest = mesh_lib.abstract_model(
      lambda: methods.build_model(config, eos_id=tok.eos_id, seed=config.seed), mesh)
  _, restored = checkpoint.restore_model(
      workdir, None, {"params": abstract_params, "model_state": abstract_rest})
  here = runner.run_evaluators(runner.build_evaluators(config, tok, mesh, graphdef), restored)
  for key in ("linear_probe/top1", "linear_probe/val_top1", "linear_probe/l2"):
    assert results[key] == pytest.approx(here[key]), key


def test_zeroshot_and_linear_probe_on_tfds_mock_data(monkeypatch):
  from tests.tiny import tiny_config
  c = tiny_config("")
  c.evals.zeroshot.update(dict(dataset="cifar10", batch_size=16, templates="short",
                               class_names=tuple(f"class {i}" for i in range(10))))
  c.evals.linear_probe.update(dict(enabled=True, dataset="cifar10", batch_size=16, steps=10))
  c.evals.retrieval.enabled = False
  c.model.image.image_size = 32
  mesh = mesh_lib.make_mesh(dict(data=8))
  from xclip_jax.data import tokenizer as tokenizer_lib
  tok = tokenizer_lib.Tokenizer(model_proto=tokenizer_lib.train_tokenizer(
      ["class zero one two three four five six seven eight nine"] * 50 +
      [t.format("x") for t in templates.SHORT] * 20, vocab_size=64))
  with tfds.testing.mock_data(num_examples=20):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    graphdef, params, rest = mesh_lib.create_sharded(
        lambda: methods.build_model(c, eos_id=2, seed=0), mesh)
    evaluators = runner.build_evaluators(c, tok, mesh, graphdef)
    results = runner.run_evaluators(evaluators, {"params": params, "model_state": rest})
    # Independent recomputation on the evaluators' own batches, unsharded and unjitted.
    model = methods.build_model(c, eos_id=2, seed=0)
    (zs,) = [e for e in evaluators if e.name == "zeroshot"]
    classes = zeroshot.class_embeddings(model.encode_text(zs._prompt_ids[: zs._num_prompts]), 10)
    ranks = []
    for batch in zs._dataset.as_numpy_iterator():
      logits = np.asarray(model.encode_image(batch["image"]) @ classes.T)
      true = logits[np.arange(len(logits)), batch["label"]]
      ranks += list(np.sum(logits > true[:, None], axis=1)[batch["mask"] > 0])
    (lp,) = [e for e in evaluators if e.name == "linear_probe"]
    splits = {}
    for split, ds in lp._splits.items():
      rows = [(model.encode_image(b["image"])[b["mask"] > 0], b["label"][b["mask"] > 0])
              for b in ds.as_numpy_iterator()]
      splits[split] = tuple(np.concatenate(x) for x in zip(*rows))
  assert results["zeroshot/examples"] == 20            # 20 real of 32 padded rows
  ranks = np.array(ranks)
  assert results["zeroshot/top1"] == pytest.approx(100 * np.mean(ranks < 1))
  assert results["zeroshot/top5"] == pytest.approx(100 * np.mean(ranks < 5))
  probe = linear_probe.linear_probe(splits["train"], splits["val"], splits["test"], 10, steps=10)
  assert results["linear_probe/top1"] == pytest.approx(probe["top1"])
  assert results["linear_probe/train_examples"] == len(splits["train"][1])
  assert zs.class_names[3] == "class 3"
