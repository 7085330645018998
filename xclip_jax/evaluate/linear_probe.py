"""Linear probe: multinomial logistic regression on frozen image features, its L2 strength chosen
on a validation split, then refit on train + validation and scored on test (CLIP's protocol,
with optax's L-BFGS in place of scikit-learn's).

Features are standardised with the training mean/std first, so one lambda grid suits every model.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_L2 = tuple(10.0 ** e for e in range(-6, 3))   # 1e-6 ... 1e2


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, num_classes: int,
                            l2: float, steps: int = 300) -> tuple[np.ndarray, np.ndarray]:
  """(weights [D, C], bias [C]) minimising mean cross-entropy + l2/2 * ||W||^2 with L-BFGS."""
  params = _fit(jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.int32),
                jnp.float32(l2), num_classes, steps)
  return np.asarray(params["w"]), np.asarray(params["b"])


@functools.partial(jax.jit, static_argnums=(3, 4))
def _fit(x: jax.Array, y: jax.Array, l2: jax.Array, num_classes: int, steps: int):
  def loss_fn(params):
    logits = x @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)

  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def body(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(body, (params, solver.init(params)), None, length=steps)
  return params


def accuracy(features: np.ndarray, labels: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
  return 100.0 * float(np.mean(np.argmax(features @ w + b, axis=1) == labels))


def linear_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], num_classes: int,
                 l2_grid: Sequence[float] = DEFAULT_L2, steps: int = 300) -> dict[str, float]:
  """Sweeps l2 on (train -> val), refits on train + val with the best, scores test (percent)."""
  mean, std = train[0].mean(0), train[0].std(0) + 1e-6
  norm = lambda f: (np.asarray(f, np.float32) - mean) / std
  xtr, xva, xte = norm(train[0]), norm(val[0]), norm(test[0])
  scores = {}
  for l2 in l2_grid:
    w, b = fit_logistic_regression(xtr, train[1], num_classes, l2, steps)
    scores[l2] = accuracy(xva, val[1], w, b)
  best = max(scores, key=lambda l2: (scores[l2], l2))       # ties: the stronger regulariser
  w, b = fit_logistic_regression(np.concatenate([xtr, xva]), np.concatenate([train[1], val[1]]),
                                 num_classes, best, steps)
  return {"top1": accuracy(xte, test[1], w, b), "val_top1": scores[best], "l2": best}


class LinearProbeEvaluator:
  """Top-1 of a linear probe on frozen image features of a TFDS classification dataset: the
  feature space the method names (`methods.Method.probe_space`: CLIP's L2-normalised
  embeddings; nCLIP, whose projection is never trained, its pooled class-token features).

  Validation is the last `val_percent`% of the train split (TFDS slicing), unless `val_split` names
  one; `max_examples` caps the train split (after slicing off validation).
  """

  def __init__(self, name: str, eval_cfg, config, tokenizer, mesh, graphdef):
    del tokenizer
    from xclip_jax.data import datasets, eval_datasets  # TensorFlow only where data is read
    from xclip_jax import methods
    from xclip_jax.parallel import mesh as mesh_lib

    self.name, self._mesh, self._graphdef = name, mesh, graphdef
    self._cfg = eval_cfg
    self._space = methods.get_method(config.method).probe_space
    data_dir = eval_cfg.data_dir or config.data.data_dir or None
    builtin = config.data.builtin if eval_cfg.dataset == config.data.name else None
    builder = datasets.prepare_dataset(eval_cfg.dataset, data_dir, builtin)
    self._num_classes = builder.info.features[eval_cfg.label_key].num_classes
    train, val = eval_cfg.train_split, eval_cfg.val_split
    num_train = eval_datasets.split_size(builder, train)
    if not val:
      num_train -= num_train * int(eval_cfg.val_percent) // 100
      val = f"{train}[{num_train}:]"
    if eval_cfg.max_examples:
      num_train = min(num_train, int(eval_cfg.max_examples))
    train = f"{train}[:{num_train}]"
    host_batch = mesh_lib.batch_size_per_process(eval_cfg.batch_size, mesh)
    make = lambda split: eval_datasets.make_classification_dataset(
        eval_cfg.dataset, split=split, image_size=config.model.image.image_size,
        mean=config.data.mean, std=config.data.std, process_index=jax.process_index(),
        process_count=jax.process_count(), data_dir=data_dir, builtin=builtin,
        image_key=eval_cfg.image_key, label_key=eval_cfg.label_key, host_batch_size=host_batch,
        transform=eval_datasets.eval_transform_name(config))
    names = {"train": train, "val": val, "test": eval_cfg.test_split}
    self._splits = {k: make(split) for k, split in names.items()}
    self._expected = {k: eval_datasets.split_size(builder, split) for k, split in names.items()}
    self._split_names = names

  def evaluate(self, params, model_state) -> dict[str, float]:
    from xclip_jax.data import eval_datasets  # noqa: PLC0415
    from xclip_jax.evaluate import features
    data, skipped = {}, 0
    for split, ds in self._splits.items():
      feats = features.image_features(ds.as_numpy_iterator(), self._mesh, self._graphdef,
                                      params, model_state, (self._space,), keys=("label",))
      data[split] = (feats[self._space], feats["label"])
      skipped += eval_datasets.skipped_records(self.name, self._split_names[split],
                                               self._expected[split], len(feats["label"]))
    results = linear_probe(data["train"], data["val"], data["test"], self._num_classes,
                           steps=int(self._cfg.steps))
    results["train_examples"] = float(len(data["train"][1]))
    results["skipped"] = float(skipped)
    return {f"{self.name}/{k}": v for k, v in results.items()}
