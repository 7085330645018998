"""DeCLIP's total loss (Li et al., ICLR 2022) as its official code combines the supervisions.

  multi-view (MVS, includes CLIP): mean of symmetric InfoNCE over the 2 image views x
                                   {masked caption t, EDA caption t_aug}: 4 pairs, each against
                                   negatives of the same view type
  ISS: SimSiam between the 2 image views' projector/predictor outputs
  TSS: masked language modelling on the masked caption
  NNS: image views -> nearest queue neighbours of t and t_aug (image -> text direction only)
  total = w_clip * MVS + w_simsiam * ISS + w_mlm * TSS + w_nns * NNS   (0.4/0.2/0.2/0.2)

The code's "CLIP" and "MVS" terms are one average under one weight, unlike the paper's formula
(../reference notes: follow the code). The caption view `t` is the MLM-masked caption: the masked
forward pass gives both the CLIP text embedding and the MLM predictions.

`pair_loss` (symmetric InfoNCE) and `image_to_text` (its image -> text half) default to the global
forms; the registry passes the chunked shard_map forms under config.contrastive.impl=chunked.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from xclip_jax.objectives import clip, mlm, nns, simsiam


PairLoss = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def multi_view_loss(image_views: tuple[jax.Array, ...], text_views: tuple[jax.Array, ...],
                    scale: jax.Array, pair_loss: PairLoss = clip.clip_loss
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean of pair_loss over every (image view, text view) pair; metrics of the first pair."""
  losses, first = [], None
  for image in image_views:
    for text in text_views:
      loss, metrics = pair_loss(image, text, scale)
      losses.append(loss)
      first = first or metrics
  return sum(losses) / len(losses), first


def declip_loss(outputs: Mapping[str, jax.Array], mlm_targets: jax.Array, mlm_weights: jax.Array,
                queue_state: Mapping[str, jax.Array], weights: Mapping[str, float], *,
                pair_loss: PairLoss = clip.clip_loss,
                image_to_text: Callable[..., jax.Array] = nns.image_to_text_nce
                ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
  """The weighted DeCLIP loss, each term's value, and the queue after enqueueing [t_aug; t].

  `outputs` holds: image_emb, image_emb2 (views), text_emb (masked caption), text_emb_aug (EDA),
  logit_scale, z1, z2, p1, p2 (SimSiam), mlm_logits [B, L, V].
  """
  scale = outputs["logit_scale"]
  images = (outputs["image_emb"], outputs["image_emb2"])
  texts = (outputs["text_emb"], outputs["text_emb_aug"])
  terms: dict[str, jax.Array] = {}
  metrics: dict[str, jax.Array] = {}

  terms["clip_loss"], clip_metrics = multi_view_loss(images, texts, scale, pair_loss)
  metrics.update(clip_metrics)
  terms["simsiam_loss"] = simsiam.simsiam_loss(outputs["p1"], outputs["z1"],
                                               outputs["p2"], outputs["z2"])
  terms["mlm_loss"], mlm_metrics = mlm.mlm_loss(outputs["mlm_logits"], mlm_targets, mlm_weights)
  metrics.update(mlm_metrics)

  # Query the queue as it was before this step, then enqueue the EDA texts, then the captions.
  queue = queue_state["queue"]
  neighbours = tuple(nns.nearest_neighbours(queue, t) for t in texts)
  terms["nns_loss"] = nns.nns_loss(images, neighbours, scale, image_to_text)
  new_queue = nns.enqueue(queue_state, jnp.concatenate([texts[1], texts[0]], axis=0))

  total = sum(float(weights[name]) * value for name, value in terms.items())
  metrics.update(terms)
  return total, metrics, new_queue
