"""Scoring spaces (evaluate/spaces.py): nCLIP scored through its prototype distributions.

Hand-built prototype assignments that match score 100% zero-shot and retrieval, random ones score
chance; the model's prototype features equal its training outputs' distributions; the
evaluators and `xclip_jax.load`'s model report each method's spaces under the documented names.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from xclip_jax import api, methods
from xclip_jax.evaluate import retrieval, runner, spaces, zeroshot
from xclip_jax.parallel import mesh as mesh_lib

import configs.clip as clip_config
import configs.nclip as nclip_config
import configs.xclip as xclip_config


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _assignments(prototypes, temp, rng, noise=0.3, k=32):
  """Logits over k prototypes peaked at `prototypes`, with noise, at temperature `temp`."""
  logits = noise * rng.normal(size=(len(prototypes), k))
  logits[np.arange(len(prototypes)), prototypes] += 4.0
  return logits / temp


def test_prototype_space_arithmetic_matches_numpy():
  rng = np.random.default_rng(0)
  q = np.exp(_log_softmax(rng.normal(size=(3 * 4, 6))))                # 3 classes x 4 prompts
  np.testing.assert_allclose(spaces.class_features("prototypes", q, 3),
                             q.reshape(3, 4, 6).mean(1), rtol=1e-6)
  log_p = _log_softmax(rng.normal(size=(5, 6)))
  classes = q.reshape(3, 4, 6).mean(1)
  expected = np.array([[np.sum(classes[c] * log_p[i]) for c in range(3)] for i in range(5)])
  np.testing.assert_allclose(spaces.scores(log_p, classes), expected, rtol=1e-5)
  np.testing.assert_allclose(spaces.class_features("clip", q, 3),
                             zeroshot.class_embeddings(jnp.asarray(q), 3), rtol=1e-6)
  assert spaces.metric_name("zeroshot", "prototypes", "top1", ("prototypes",)) == "zeroshot/top1"
  assert spaces.metric_name("zeroshot", "prototypes", "top1",
                            ("clip", "prototypes")) == "zeroshot/prototypes/top1"
  with pytest.raises(ValueError, match="Scoring spaces"):
    spaces.check_spaces(("pooled",))


def test_matching_prototype_assignments_score_100_and_random_ones_chance():
  rng = np.random.default_rng(1)
  num_classes, templates, n = 10, 4, 2000
  labels = rng.integers(0, num_classes, n)
  prompt_protos = np.repeat(np.arange(num_classes), templates)          # class c -> prototype c
  text = np.exp(_log_softmax(_assignments(prompt_protos, 0.05, rng)))
  classes = spaces.class_features("prototypes", text, num_classes)
  mask = np.ones(n)

  def top1(image_protos):
    log_p = _log_softmax(_assignments(image_protos, 0.1, rng))
    logits = spaces.scores(log_p, classes)
    return 100 * int(zeroshot.topk_correct(logits, labels, mask, 1)) / n

  assert top1(labels) == 100.0                                # each image on its class's prototype
  assert abs(top1(rng.permutation(labels)) - 100 / num_classes) < 2.5    # shuffled: chance
  assert abs(top1(rng.integers(0, 32, n)) - 100 / num_classes) < 2.5     # anywhere: chance

  # Retrieval by the same score: 64 images, each on its own prototype, 3 captions each.
  n, k = 64, 64
  caption_image = np.repeat(np.arange(n), 3)
  image_feats = _log_softmax(_assignments(np.arange(n), 0.1, rng, k=k))
  caption_feats = lambda protos: np.exp(_log_softmax(_assignments(protos, 0.05, rng, k=k)))
  own = retrieval.recall_at_k(image_feats, caption_feats(caption_image), caption_image, ks=(1,))
  assert own == {"i2t_r1": 100.0, "t2i_r1": 100.0}
  rand = retrieval.recall_at_k(image_feats, caption_feats(rng.integers(0, k, 3 * n)),
                               caption_image, ks=(1,))
  # Chance: a caption finds its image first w.p. 1/64; an image one of its 3 captions ~3/64.
  assert rand["t2i_r1"] < 6 and rand["i2t_r1"] < 14


def _tiny(module, **fields):
  c = module.get_config("demo")
  c.model.update(dict(embed_dim=8))
  c.model.image.update(dict(width=16, layers=1, heads=2, patch_size=16))
  c.model.text.update(dict(width=16, layers=1, heads=2, vocab_size=64))
  c.nclip.update(dict(prototypes=24, hidden=16, bottleneck=8, target_temp=0.07))
  c.update_from_flattened_dict(fields) if fields else None
  return c


def test_model_prototype_features_are_the_training_distributions():
  c = _tiny(nclip_config)
  model = methods.build_model(c, eos_id=2, seed=0)
  rng = np.random.default_rng(2)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(4, 64, size=(4, 12)).astype(np.int32)
  ids[:, 7], ids[:, 8:] = 2, 0
  out = model({"image": images, "text": ids}, train=False)
  feats = model.image_features(images, ("prototypes", "clip", "pooled"))
  np.testing.assert_allclose(feats["prototypes"],
                             _log_softmax(np.asarray(out["image_proto_logits"]) / 0.1), atol=1e-5)
  np.testing.assert_allclose(feats["clip"], out["image_emb"], atol=1e-6)
  np.testing.assert_allclose(feats["pooled"], out["image_pooled"], atol=1e-6)
  text = model.encode_text(ids, "prototypes")
  np.testing.assert_allclose(text, np.exp(_log_softmax(np.asarray(out["text_proto_logits"]) /
                                                       0.07)), atol=1e-6)
  with pytest.raises(ValueError, match="prototypes"):
    methods.build_model(_tiny(clip_config), eos_id=2, seed=0).encode_image(images, "prototypes")


def test_methods_name_their_spaces():
  assert methods.get_method("clip").scoring_spaces == ("clip",)
  assert methods.get_method("nclip").scoring_spaces == ("prototypes",)
  assert methods.get_method("nclip").probe_space == "pooled"
  assert methods.get_method("xclip").scoring_spaces == ("clip", "prototypes")


@pytest.mark.slow
@pytest.mark.parametrize("module,expected", [
    (nclip_config, {"zeroshot/top1", "zeroshot/top5", "retrieval/i2t_r1"}),
    (xclip_config, {"zeroshot/top1", "zeroshot/prototypes/top1", "zeroshot/prototypes/top5",
                    "retrieval/i2t_r1", "retrieval/prototypes/t2i_r10"})])
def test_evaluators_score_each_space_like_numpy(demo_dir, module, expected):
  from xclip_jax.data import tokenizer as tokenizer_lib
  c = _tiny(module, **{"data.data_dir": demo_dir, "evals.zeroshot.max_examples": 40,
                       "evals.zeroshot.batch_size": 16, "evals.retrieval.max_examples": 24,
                       "evals.retrieval.batch_size": 16})
  c.model.text.vocab_size = 1024                                  # the demo tokenizer's
  tok = tokenizer_lib.resolve_tokenizer(c)
  mesh = mesh_lib.make_mesh(dict(data=8))
  graphdef, params, rest = mesh_lib.create_sharded(
      lambda: methods.build_model(c, eos_id=tok.eos_id, seed=0), mesh)
  evaluators = runner.build_evaluators(c, tok, mesh, graphdef)
  results = runner.run_evaluators(evaluators, {"params": params, "model_state": rest})
  assert expected <= set(results)
  if module is nclip_config:                       # no CLIP-space keys for nCLIP at all
    assert not [k for k in results if "/clip/" in k or "/prototypes/" in k]

  # Independent recomputation of the prototype zero-shot top-1 from the same images.
  (zs,) = [e for e in evaluators if e.name == "zeroshot"]
  model = methods.build_model(c, eos_id=tok.eos_id, seed=0)
  q = np.asarray(model.encode_text(zs._prompt_ids[: zs._num_prompts], "prototypes"))
  classes = q.reshape(len(zs.class_names), -1, q.shape[-1]).mean(1)
  correct = count = 0
  for batch in zs._dataset.as_numpy_iterator():
    log_p = np.asarray(model.encode_image(batch["image"], "prototypes"))
    keep = batch["mask"] > 0
    correct += int(np.sum(((log_p @ classes.T).argmax(1) == batch["label"])[keep]))
    count += int(keep.sum())
  key = "zeroshot/top1" if module is nclip_config else "zeroshot/prototypes/top1"
  assert count == 40
  assert results[key] == pytest.approx(100 * correct / count, abs=100 / count + 1e-6)


@pytest.mark.slow
def test_loaded_model_defaults_to_the_methods_first_space():
  c = _tiny(xclip_config)
  mesh = mesh_lib.make_mesh(dict(data=8))
  graphdef, params, rest = mesh_lib.create_sharded(
      lambda: methods.build_model(c, eos_id=2, seed=0), mesh)

  class Tok:
    eos_id = 2

    def encode(self, texts, length):
      ids = np.zeros((len(texts), length), np.int32)
      for i, t in enumerate(texts):
        row = [4 + (ord(ch) % 60) for ch in t][: length - 1] + [2]
        ids[i, :len(row)] = row
      return ids

  rng = np.random.default_rng(3)
  images = rng.normal(size=(5, 32, 32, 3)).astype(np.float32)
  model = methods.build_model(c, eos_id=2, seed=0)
  for method, first in (("xclip", "clip"), ("nclip", "prototypes")):
    c.method = method
    loaded = api.LoadedModel(c, 0, mesh, graphdef, params, rest, Tok())
    assert loaded.scoring_spaces[0] == first
    np.testing.assert_allclose(loaded.encode_image(images), model.encode_image(images, first),
                               atol=1e-5)
  names = ["red circle", "blue square"]
  q = loaded.encode_text([t.format(n) for n in names for t in ("a {}.", "the {}")])
  np.testing.assert_allclose(loaded.zeroshot_classifier(names, templates=["a {}.", "the {}"]),
                             q.reshape(2, 2, -1).mean(1), rtol=1e-5)
  log_p = loaded.encode_image(images)
  np.testing.assert_allclose(loaded.similarity(log_p, q), log_p @ q.T, rtol=1e-5)   # no scale
  clip_img = loaded.encode_image(images, space="clip")
  clip_txt = loaded.encode_text(["a red circle."], space="clip")
  np.testing.assert_allclose(loaded.similarity(clip_img, clip_txt, space="clip"),
                             loaded.logit_scale * clip_img @ clip_txt.T, rtol=1e-5)
