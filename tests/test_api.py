"""xclip_jax.load and notebooks/inspect_checkpoint.ipynb on a tiny trained checkpoint.

The checks compare the notebook API with independent paths: the checkpoint as read by
`checkpoint.load_params`, the in-loop zero-shot evaluator (TF input pipeline, sharded batches)
and the model called directly.
"""

import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import xclip_jax
from xclip_jax import checkpoint, train
from xclip_jax.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "inspect_checkpoint.ipynb")


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
  """(workdir, in-loop metrics) of a 2-step tiny run with a checkpoint at step 2."""
  from tests.tiny import tiny_config
  workdir = str(tmp_path_factory.mktemp("api") / "run")
  metrics = train.run(tiny_config(demo_dir, total_steps=2, **{"checkpoint.every": 2}), workdir)
  return workdir, metrics


@pytest.fixture(scope="module")
def model(trained):
  return xclip_jax.load(trained[0])


def _test_examples(model, n):
  ev = model.config.evals.zeroshot
  builder = datasets.prepare_dataset(ev.dataset, model.config.data.data_dir)
  examples = list(builder.as_dataset(split=ev.split).take(n).as_numpy_iterator())
  return [e["image"] for e in examples], np.array([e["label"] for e in examples])


def test_load_restores_the_checkpoint(trained, model):
  workdir, _ = trained
  assert model.step == 2 and model.config.method == "clip"
  stored = checkpoint.load_params(workdir)
  flat_stored = jax.tree_util.tree_leaves_with_path(stored)
  flat_loaded = dict(jax.tree_util.tree_leaves_with_path(model.params))
  assert len(flat_stored) == len(flat_loaded)
  for path, value in flat_stored:
    np.testing.assert_array_equal(np.asarray(flat_loaded[path]), value)
  table = model.param_table()
  assert sum(r.count for r in table) == sum(v.size for _, v in flat_stored) == model.num_params()
  row = next(r for r in table if r.path == "image/pos_embedding")
  cfg = model.config.model.image
  tokens = 1 + (cfg.image_size // cfg.patch_size)**2
  assert row.shape == (tokens, cfg.width) and row.dtype == "float32" and row.sharding.startswith("P(")
  assert model.logit_scale == pytest.approx(min(np.exp(float(stored["logit_scale"])), 100.0))


def test_zeroshot_through_the_api_matches_the_evaluator(trained, model):
  _, metrics = trained
  n = int(metrics["zeroshot/examples"])
  images, labels = _test_examples(model, n)
  names = datasets.class_names("xclip_demo", model.config.data.data_dir)
  classifier = model.zeroshot_classifier(names, templates=model.config.evals.zeroshot.templates)
  assert classifier.shape == (len(names), model.config.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(classifier, axis=1), 1.0, atol=1e-5)
  top1 = 100.0 * np.mean((model.encode_image(images) @ classifier.T).argmax(1) == labels)
  # Same preprocessing ops and weights; batch layout differs, so allow one near-tie flip.
  assert abs(top1 - metrics["zeroshot/top1"]) <= 100.0 / n + 1e-6


def test_image_inputs_agree_and_match_a_direct_forward(model):
  images, _ = _test_examples(model, 5)
  as_array = model.encode_image(np.stack(images))
  as_pil = model.encode_image([Image.fromarray(x) for x in images])
  as_png = []
  for x in images:
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, format="PNG")
    as_png.append(buffer.getvalue())
  np.testing.assert_allclose(model.encode_image(as_png), as_array, atol=1e-6)
  np.testing.assert_allclose(as_pil, as_array, atol=1e-6)
  # Odd counts and batch sizes are padded for the 8-device mesh and the padding dropped.
  np.testing.assert_allclose(model.encode_image(images, batch_size=3), as_array, atol=1e-5)
  pixels = model.preprocess(images)
  size = model.image_size
  assert pixels.shape == (5, size, size, 3) and pixels.dtype == np.float32
  direct = model.module.image(jnp.asarray(pixels))["embed"]
  direct = np.asarray(direct) / np.linalg.norm(np.asarray(direct), axis=1, keepdims=True)
  np.testing.assert_allclose(as_array, direct, atol=1e-5)


def test_text_encoding_and_similarity(model):
  texts = ["a red circle.", "a big blue square in the upper part", "a star", "", "a green heart"]
  emb = model.encode_text(texts, batch_size=3)
  ids = model.tokenize(texts)
  assert ids.shape == (5, model.context_length) and (ids == model.tokenizer.eos_id).any(1).all()
  np.testing.assert_allclose(model.encode_text(ids), emb, atol=1e-5)
  direct = np.asarray(model.module.text(jnp.asarray(ids))["embed"])
  np.testing.assert_allclose(emb, direct / np.linalg.norm(direct, axis=1, keepdims=True),
                             atol=1e-5)
  images, _ = _test_examples(model, 3)
  img = model.encode_image(images)
  logits = model.similarity(img, emb)
  np.testing.assert_allclose(logits, model.logit_scale * img @ emb.T, rtol=1e-6)
  probs = model.similarity(img, emb, softmax=True)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(probs.argmax(1), logits.argmax(1))


def test_bad_inputs_are_explained(model):
  with pytest.raises(ValueError, match="uint8"):
    model.encode_image([np.zeros((40, 40, 3), np.float64)])
  size = model.image_size
  with pytest.raises(ValueError, match=rf"\[N, {size}, {size}, 3\]"):
    model.encode_image(np.zeros((2, size // 2, size // 2, 3), np.float32))
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    xclip_jax.load(os.path.join(ROOT, "no_such_workdir"))


# ---- the notebook ---------------------------------------------------------------------------------


def test_notebook_is_committed_without_outputs():
  import nbformat
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
def test_notebook_executes_on_a_tiny_checkpoint(trained, model, demo_dir, monkeypatch):
  import nbclient
  import nbformat
  workdir, _ = trained
  monkeypatch.setenv("XCLIP_WORKDIR", workdir)
  monkeypatch.setenv("XCLIP_DATA_DIR", demo_dir)
  monkeypatch.setenv("XCLIP_NUM_IMAGES", "12")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  figures = [o for o in outputs if "image/png" in o.get("data", {})]
  tables = [o for o in outputs if "text/markdown" in o.get("data", {})]
  assert len(figures) == 2                                   # similarity matrix + image grid
  assert "image/ln_pre/scale" in tables[0]["data"]["text/markdown"]
  assert "step 2, method 'clip'" in text
  assert f"parameters: {model.num_params():,}" in text
  dim = model.config.model.embed_dim
  assert f"12 images -> (12, {dim}), 12 captions -> (12, {dim})" in text
  # The notebook's printed accuracy equals the API's on the same 12 images.
  images, labels = _test_examples(model, 12)
  names = datasets.class_names("xclip_demo", demo_dir)
  classifier = model.zeroshot_classifier(names, templates="demo")
  expected = 100.0 * np.mean((model.encode_image(images) @ classifier.T).argmax(1) == labels)
  printed = float(re.search(r"zero-shot top-1 on these 12 images: ([\d.]+)%", text).group(1))
  assert printed == pytest.approx(expected, abs=0.01)
