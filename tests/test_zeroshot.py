"""Zero-shot arithmetic against numpy: class-embedding averaging and masked top-k counting."""

import jax.numpy as jnp
import numpy as np

from xclip_jax.evaluate import zeroshot


def test_class_embeddings_average_normalised_prompts():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(3 * 4, 8)).astype(np.float32)     # 3 classes x 4 templates
  got = np.asarray(zeroshot.class_embeddings(jnp.asarray(emb), 3))
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  ref = unit.reshape(3, 4, 8).mean(1)
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_topk_counts_only_unmasked_rows():
  logits = jnp.array([[3.0, 2.0, 1.0],    # label 0: top-1
                      [3.0, 2.0, 1.0],    # label 1: top-2
                      [3.0, 2.0, 1.0],    # label 2: top-3
                      [0.0, 9.0, 0.0]])   # label 1: top-1 but padded (mask 0)
  labels = jnp.array([0, 1, 2, 1])
  mask = jnp.array([1, 1, 1, 0])
  assert int(zeroshot.topk_correct(logits, labels, mask, 1)) == 1
  assert int(zeroshot.topk_correct(logits, labels, mask, 2)) == 2
  assert int(zeroshot.topk_correct(logits, labels, mask, 5)) == 3   # k > classes: all real rows


def test_perfect_features_score_everything_and_random_near_chance():
  rng = np.random.default_rng(1)
  classes = np.eye(10, dtype=np.float32)
  labels = rng.integers(0, 10, size=2000)
  perfect = classes[labels]
  mask = np.ones(2000)
  assert int(zeroshot.topk_correct(perfect @ classes.T, labels, mask, 1)) == 2000
  random = rng.normal(size=(2000, 10)).astype(np.float32)
  acc = int(zeroshot.topk_correct(random @ classes.T, labels, mask, 1)) / 2000
  assert 0.05 < acc < 0.15
