"""Zero-shot classification: class names x prompt templates -> per-class text features -> top-k.

The arithmetic is in pure functions (`class_embeddings`, `topk_correct`, and evaluate/spaces.py)
so it can be tested against numpy; `ZeroShotEvaluator` wires them to a model, a mesh and a TFDS
split. Padded examples (the split is rarely a multiple of the batch) carry mask 0 and are never
counted; records whose image cannot be decoded are skipped and counted (`<name>/skipped`). Class
names, templates and the split of the standard benchmarks come from benchmarks.py (curated
package data). It scores in every space the method names (spaces.py: CLIP embeddings, nCLIP's
prototype distributions); the first space's results keep the plain metric names.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from xclip_jax import methods
from xclip_jax.evaluate import benchmarks
from xclip_jax.evaluate import spaces as spaces_lib
from xclip_jax.parallel import mesh as mesh_lib


def class_embeddings(prompt_emb: jax.Array, num_classes: int) -> jax.Array:
  """[C*T, D] prompt embeddings (class-major) -> [C, D]: normalise, average over T, renormalise."""
  return spaces_lib.clip_classes(prompt_emb, num_classes)


def topk_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array, k: int) -> jax.Array:
  """Number of unmasked rows whose label is among the k highest logits."""
  k = min(k, logits.shape[-1])
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  # Rank = how many classes score strictly higher than the true one (ties count in its favour).
  rank = jnp.sum(logits > label_logit, axis=-1)
  return jnp.sum((rank < k) & (mask > 0))


class ZeroShotEvaluator:
  """Top-1/top-5 zero-shot accuracy of a two-tower model on a TFDS classification split."""

  def __init__(self, name: str, eval_cfg: ml_collections.ConfigDict, config, tokenizer,
               mesh: jax.sharding.Mesh, graphdef: Any):
    from xclip_jax.data import datasets, eval_datasets  # TensorFlow only where data is read

    self.name = name
    self._mesh = mesh
    self._graphdef = graphdef
    self._spaces = spaces_lib.check_spaces(methods.get_method(config.method).scoring_spaces)
    data_dir = eval_cfg.data_dir or config.data.data_dir or None
    builtin = eval_cfg.dataset == config.data.name and config.data.builtin
    builder = datasets.prepare_dataset(eval_cfg.dataset, data_dir, builtin)
    # Names, templates, split and label map: config overrides > curated entry > TFDS's labels.
    setup = benchmarks.zeroshot_setup(name, eval_cfg,
                                      builder.info.features[eval_cfg.label_key].names)
    self.class_names = list(setup.class_names)
    self.split = setup.split
    self._templates = setup.templates
    logging.info("Zero-shot %s on %s:%s: %d classes (names from %s) x %d templates.", name,
                 eval_cfg.dataset, self.split, len(self.class_names), setup.source,
                 len(self._templates))
    prompts = [t.format(c.replace("_", " ")) for c in self.class_names for t in self._templates]
    ids = tokenizer.encode(prompts, config.model.text.context_length)
    # Prompts are encoded in chunks (ImageNet: 1,000 classes x 80 templates would not fit in
    # one forward pass) of a multiple of the batch axes, so each shards evenly; pads dropped.
    shards = int(np.prod([mesh.shape[a] for a in mesh_lib.BATCH_AXES]))
    self._prompt_chunk = -(-min(int(eval_cfg.batch_size), len(ids)) // shards) * shards
    pad = (-len(ids)) % self._prompt_chunk
    self._num_prompts = len(ids)
    self._prompt_ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
    self._dataset = eval_datasets.make_eval_dataset(
        eval_cfg, config, process_index=jax.process_index(), process_count=jax.process_count(),
        host_batch_size=mesh_lib.batch_size_per_process(eval_cfg.batch_size, mesh),
        split=self.split, label_map=setup.label_map)
    self._expected = eval_datasets.expected_examples(
        eval_cfg.dataset, split=self.split, data_dir=data_dir, builtin=builtin,
        max_examples=eval_cfg.max_examples)
    self._batch_sharding = mesh_lib.batch_sharding(mesh)
    self._encode_text = jax.jit(self._encode_text_fn)
    self._count = jax.jit(self._count_fn, out_shardings=mesh_lib.replicated(mesh))

  def _encode_text_fn(self, params, model_state, ids):
    model = nnx.merge(self._graphdef, params, model_state)
    return model.text_features(ids, self._spaces)

  def _count_fn(self, params, model_state, class_features, batch):
    model = nnx.merge(self._graphdef, params, model_state)
    image_features = model.image_features(batch["image"], self._spaces)
    mask = batch["mask"]
    counts = {"count": jnp.sum(mask > 0)}
    for space in self._spaces:
      logits = spaces_lib.scores(image_features[space], class_features[space])
      counts[space] = {"top1": topk_correct(logits, batch["label"], mask, 1),
                       "top5": topk_correct(logits, batch["label"], mask, 5)}
    return counts

  def evaluate(self, params, model_state) -> dict[str, float]:
    num_classes = len(self.class_names)
    with jax.set_mesh(self._mesh):
      chunks = [self._encode_text(params, model_state, jax.make_array_from_process_local_data(
          self._batch_sharding, self._local_prompts(start)))
                for start in range(0, len(self._prompt_ids), self._prompt_chunk)]
      class_features = {space: spaces_lib.class_features(
          space, jnp.concatenate([c[space] for c in chunks])[: self._num_prompts], num_classes)
          for space in self._spaces}
      totals = {"count": 0, **{(s, k): 0 for s in self._spaces for k in ("top1", "top5")}}
      for batch in self._dataset.as_numpy_iterator():
        batch = jax.make_array_from_process_local_data(self._batch_sharding, batch)
        counts = jax.device_get(self._count(params, model_state, class_features, batch))
        totals["count"] += int(counts["count"])
        for space in self._spaces:
          for k in ("top1", "top5"):
            totals[(space, k)] += int(counts[space][k])
    from xclip_jax.data import eval_datasets  # noqa: PLC0415
    n = max(totals["count"], 1)
    skipped = eval_datasets.skipped_records(self.name, self.split, self._expected, totals["count"])
    results = {f"{self.name}/examples": float(totals["count"]),
               f"{self.name}/skipped": float(skipped)}
    for space in self._spaces:
      for k in ("top1", "top5"):
        key = spaces_lib.metric_name(self.name, space, k, self._spaces)
        results[key] = 100.0 * totals[(space, k)] / n
    return results

  def _local_prompts(self, start: int) -> np.ndarray:
    """This process's rows of the chunk at `start` of the (replicated on every host) prompts."""
    chunk = self._prompt_ids[start:start + self._prompt_chunk]
    return chunk.reshape(jax.process_count(), -1, chunk.shape[1])[jax.process_index()]
