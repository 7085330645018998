"""DeCLIP's model: the shared CLIP towers plus a SimSiam projector/predictor on the image embedding
and an MLM head on the text tokens.

One forward pass per tower serves both views: the views are interleaved on the batch axis
(rows 2i and 2i+1 are sample i's views), so each device keeps its own samples' views and the
stacking moves no data between devices.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from xclip_jax.models import heads
from xclip_jax.models import transformer
from xclip_jax.models.two_tower import TwoTower, l2_normalize


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
  """[B, ...] x 2 -> [2B, ...] with a's rows at even and b's rows at odd positions."""
  return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def split_views(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = x.reshape((-1, 2) + x.shape[1:])
  return x[:, 0], x[:, 1]


class DeclipModel(TwoTower):
  """`model_cfg` is config.model; `declip_cfg` is config.declip (head sizes)."""

  @transformer.mesh_optional
  def __init__(self, model_cfg: Mapping[str, Any], declip_cfg: Mapping[str, Any], *, eos_id: int,
               rngs: nnx.Rngs):
    super().__init__(model_cfg, eos_id=eos_id, rngs=rngs)
    dtype = transformer.compute_dtype(model_cfg["dtype"])
    embed_dim = int(model_cfg["embed_dim"])
    out_dim = int(declip_cfg["projector_dim"])
    self.projector = heads.SimSiamProjector(embed_dim, int(declip_cfg["projector_hidden"]), out_dim,
                                            dtype=dtype, rngs=rngs)
    self.predictor = heads.SimSiamPredictor(out_dim, int(declip_cfg["predictor_hidden"]),
                                            dtype=dtype, rngs=rngs)
    self.mlm_head = heads.MLMHead(int(model_cfg["text"]["width"]),
                                  int(model_cfg["text"]["vocab_size"]), dtype=dtype, rngs=rngs)

  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = True
               ) -> dict[str, jax.Array]:
    """batch: image, image2 (two augmented views), text (the MLM-masked caption), text_aug (EDA).

    Without image2/text_aug (evaluation) this is the plain CLIP forward.
    """
    if "image2" not in batch:
      return super().__call__(batch, train=train)
    image = self.image(interleave(batch["image"], batch["image2"]),
                       patch_keys=self.image.patch_keys(batch, train=train, views=(0, 1)))
    text = self.text(interleave(batch["text"], batch["text_aug"]))
    f1, f2 = split_views(image["embed"])
    t, t_aug = split_views(text["embed"])
    tokens, _ = split_views(text["tokens"])
    # BatchNorm statistics per view, as DeCLIP calls its heads once per view.
    z1, z2 = self.projector(f1, train=train), self.projector(f2, train=train)
    p1, p2 = self.predictor(z1, train=train), self.predictor(z2, train=train)
    return dict(image_emb=l2_normalize(f1), image_emb2=l2_normalize(f2),
                text_emb=l2_normalize(t), text_emb_aug=l2_normalize(t_aug),
                logit_scale=self.scale(), z1=z1, z2=z2, p1=p1, p2=p2,
                mlm_logits=self.mlm_head(tokens))
