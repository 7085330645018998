"""Exact image <-> text retrieval recall (R@1/5/10) over a whole split with several captions per
image, as CLIP and the retrieval literature report it:

  image -> text: an image counts at k if any of its own captions is among the k best captions.
  text -> image: a caption counts at k if its image is among the k best images.

Ranks count strictly better candidates, so ties go in the query's favour. The score matrix is
built in row chunks on the host from the gathered features (5k x 25k for COCO fits easily): the
dot product of image and text features, i.e. the cosine of CLIP embeddings or nCLIP's
Σ_k q_t(k) log p_v(k) (evaluate/spaces.py); every space the method names is reported, the first
under the plain metric names.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KS = (1, 5, 10)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray,
                ks: Sequence[int] = KS, chunk: int = 1024) -> dict[str, float]:
  """Recall in percent; score(image i, caption j) = image_emb[i] · text_emb[j].

  Args:
    image_emb: [N, D] image features of one scoring space (padding already removed), e.g.
      L2-normalised embeddings.
    text_emb: [M, D] caption features of the same space.
    caption_image: [M] index in [0, N) of each caption's image.
  """
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  caption_image = np.asarray(caption_image)
  n, m = len(image_emb), len(text_emb)
  if m == 0 or n == 0:
    raise ValueError("retrieval needs at least one image and one caption.")
  if caption_image.min() < 0 or caption_image.max() >= n:
    raise ValueError("caption_image indexes images outside [0, N).")

  i2t_rank = np.empty(n, np.int64)
  t2i_rank = np.empty(m, np.int64)
  for start in range(0, n, chunk):
    sims = image_emb[start:start + chunk] @ text_emb.T              # [c, M]
    rows = np.arange(start, start + len(sims))
    is_own = caption_image[None, :] == rows[:, None]
    best_own = np.where(is_own, sims, -np.inf).max(axis=1)
    i2t_rank[rows] = np.sum(sims > best_own[:, None], axis=1)
  for start in range(0, m, chunk):
    sims = text_emb[start:start + chunk] @ image_emb.T              # [c, N]
    cols = np.arange(start, start + len(sims))
    true = sims[np.arange(len(sims)), caption_image[cols]]
    t2i_rank[cols] = np.sum(sims > true[:, None], axis=1)

  has_caption = np.bincount(caption_image, minlength=n) > 0
  results = {}
  for k in ks:
    results[f"i2t_r{k}"] = 100.0 * float(np.mean(i2t_rank[has_caption] < k))
    results[f"t2i_r{k}"] = 100.0 * float(np.mean(t2i_rank < k))
  return results


class RetrievalEvaluator:
  """R@1/5/10 in both directions on a TFDS split whose examples hold an image and its captions."""

  def __init__(self, name: str, eval_cfg, config, tokenizer, mesh, graphdef):
    import jax
    from xclip_jax.data import eval_datasets  # TensorFlow only where data is read
    from xclip_jax.evaluate import spaces as spaces_lib
    from xclip_jax import methods
    from xclip_jax.parallel import mesh as mesh_lib

    self.name, self._mesh, self._graphdef = name, mesh, graphdef
    self._spaces = spaces_lib.check_spaces(methods.get_method(config.method).scoring_spaces)
    self._batch_size = eval_cfg.batch_size
    data_dir = eval_cfg.data_dir or config.data.data_dir or None
    builtin = config.data.builtin if eval_cfg.dataset == config.data.name else None
    split = eval_cfg.split
    if eval_cfg.max_examples:
      split = f"{split}[:{eval_cfg.max_examples}]"
    captions = eval_datasets.read_texts(eval_cfg.dataset, split=split, text_key=eval_cfg.text_key,
                                   data_dir=data_dir, builtin=builtin, image_key=eval_cfg.image_key)
    self._num_images = len(captions)
    self._caption_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    self._ids = tokenizer.encode([c for cs in captions for c in cs],
                                 config.model.text.context_length)
    self._dataset = eval_datasets.make_classification_dataset(
        eval_cfg.dataset, split=split, image_size=config.model.image.image_size,
        mean=config.data.mean, std=config.data.std, process_index=jax.process_index(),
        process_count=jax.process_count(), data_dir=data_dir, builtin=builtin,
        image_key=eval_cfg.image_key, label_key="",
        host_batch_size=mesh_lib.batch_size_per_process(eval_cfg.batch_size, mesh),
        transform=eval_datasets.eval_transform_name(config))
    self._split = split

  def evaluate(self, params, model_state) -> dict[str, float]:
    from xclip_jax.data import eval_datasets  # noqa: PLC0415
    from xclip_jax.evaluate import features, spaces as spaces_lib
    images = features.image_features(self._dataset.as_numpy_iterator(), self._mesh,
                                     self._graphdef, params, model_state, self._spaces,
                                     keys=("index",))
    texts = features.text_features(self._ids, self._batch_size, self._mesh, self._graphdef,
                                   params, model_state, self._spaces)
    # Images that could not be decoded leave the evaluation with their captions.
    kept = np.sort(images["index"])
    position = np.full(self._num_images, -1, np.int64)
    position[kept] = np.arange(len(kept))
    caption_image = position[self._caption_image]
    has_image = caption_image >= 0
    results = {}
    for space in self._spaces:
      image_feats = np.zeros((len(kept), images[space].shape[1]), np.float32)
      image_feats[position[images["index"]]] = images[space]      # split order
      recalls = recall_at_k(image_feats, texts[space][has_image], caption_image[has_image])
      results.update({spaces_lib.metric_name(self.name, space, k, self._spaces): v
                      for k, v in recalls.items()})
    results[f"{self.name}/images"] = float(len(kept))
    results[f"{self.name}/captions"] = float(has_image.sum())
    results[f"{self.name}/skipped"] = float(eval_datasets.skipped_records(
        self.name, self._split, self._num_images, len(kept)))
    return results
