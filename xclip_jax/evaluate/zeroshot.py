"""Zero-shot classification: class names x prompt templates -> per-class text features -> top-k.

The arithmetic is in pure functions (`class_embeddings`, `topk_correct`, and evaluate/spaces.py)
so it can be tested against numpy; `ZeroShotEvaluator` wires them to a model, a mesh and a TFDS
split. Padded examples (the split is rarely a multiple of the batch) carry mask 0 and are never
counted. It scores in every space the method names (spaces.py: CLIP embeddings, nCLIP's
prototype distributions); the first space's results keep the plain metric names.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from xclip_jax.evaluate import spaces as spaces_lib
from xclip_jax.evaluate import templates as templates_lib
from xclip_jax.objectives import registry
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
    from xclip_jax.data import pipeline  # TensorFlow only where data is read

    self.name = name
    self._mesh = mesh
    self._graphdef = graphdef
    self._spaces = spaces_lib.check_spaces(registry.get_method(config.method).scoring_spaces)
    data_dir = eval_cfg.data_dir or config.data.data_dir or None
    builder = pipeline.prepare_dataset(eval_cfg.dataset, data_dir,
                                       eval_cfg.dataset == config.data.name and config.data.builtin)
    self.class_names = list(builder.info.features[eval_cfg.label_key].names)
    override = list(eval_cfg.get("class_names", ()) or ())
    if override:
      if len(override) != len(self.class_names):
        raise ValueError(f"config.evals.{name}.class_names has {len(override)} names; "
                         f"{eval_cfg.dataset} has {len(self.class_names)} classes.")
      self.class_names = override
    self._templates = templates_lib.get_templates(eval_cfg.templates)
    prompts = [t.format(c.replace("_", " ")) for c in self.class_names for t in self._templates]
    ids = tokenizer.encode(prompts, config.model.text.context_length)
    # Pad the prompt batch to a multiple of the batch axes so it shards evenly; drop pads later.
    shards = int(np.prod([mesh.shape[a] for a in mesh_lib.BATCH_AXES]))
    pad = (-len(ids)) % shards
    self._num_prompts = len(ids)
    self._prompt_ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
    self._dataset = pipeline.make_eval_dataset(
        eval_cfg, config, process_index=jax.process_index(), process_count=jax.process_count(),
        host_batch_size=mesh_lib.batch_size_per_process(eval_cfg.batch_size, mesh))
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
      ids = jax.make_array_from_process_local_data(self._batch_sharding, self._local_prompts())
      prompt_features = self._encode_text(params, model_state, ids)
      class_features = {space: spaces_lib.class_features(
          space, prompt_features[space][: self._num_prompts], num_classes)
          for space in self._spaces}
      totals = {"count": 0, **{(s, k): 0 for s in self._spaces for k in ("top1", "top5")}}
      for batch in self._dataset.as_numpy_iterator():
        batch = jax.make_array_from_process_local_data(self._batch_sharding, batch)
        counts = jax.device_get(self._count(params, model_state, class_features, batch))
        totals["count"] += int(counts["count"])
        for space in self._spaces:
          for k in ("top1", "top5"):
            totals[(space, k)] += int(counts[space][k])
    n = max(totals["count"], 1)
    results = {f"{self.name}/examples": float(totals["count"])}
    for space in self._spaces:
      for k in ("top1", "top5"):
        key = spaces_lib.metric_name(self.name, space, k, self._spaces)
        results[key] = 100.0 * totals[(space, k)] / n
    return results

  def _local_prompts(self) -> np.ndarray:
    """This process's rows of the (replicated on every host) prompt batch."""
    rows = self._prompt_ids.reshape(jax.process_count(), -1, self._prompt_ids.shape[1])
    return rows[jax.process_index()]
