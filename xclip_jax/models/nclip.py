"""nCLIP / xCLIP model: the CLIP towers plus a prototype head per modality on the pooled features
(image class token, text end-of-text token), with one prototype matrix shared by both heads
(config.nclip.shared_prototypes) so that p_v and p_t index the same K clusters."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from xclip_jax.models import heads, transformer
from xclip_jax.models.two_tower import TwoTower


class NclipModel(TwoTower):

  @transformer.mesh_optional
  def __init__(self, model_cfg: Mapping[str, Any], nclip_cfg: Mapping[str, Any], *, eos_id: int,
               rngs: nnx.Rngs):
    super().__init__(model_cfg, eos_id=eos_id, rngs=rngs)
    dtype = transformer.compute_dtype(model_cfg["dtype"])
    hidden, bottleneck = int(nclip_cfg["hidden"]), int(nclip_cfg["bottleneck"])
    layers, k = int(nclip_cfg["layers"]), int(nclip_cfg["prototypes"])
    self.image_head = heads.PrototypeHead(int(model_cfg["image"]["width"]), hidden, bottleneck,
                                          layers, dtype=dtype, rngs=rngs)
    self.text_head = heads.PrototypeHead(int(model_cfg["text"]["width"]), hidden, bottleneck,
                                         layers, dtype=dtype, rngs=rngs)
    self.shared_prototypes = bool(nclip_cfg["shared_prototypes"])
    protos = lambda: transformer.normal_param(rngs, 0.02, (bottleneck, k), ("joint", "vocab"))
    self.image_prototypes = protos()
    self.text_prototypes = None if self.shared_prototypes else protos()

  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = True
               ) -> dict[str, jax.Array]:
    out = super().__call__(batch, train=train)
    image_protos = self.image_prototypes[...]
    text_protos = image_protos if self.shared_prototypes else self.text_prototypes[...]
    out["image_proto_logits"] = self.image_head(out["image_pooled"], image_protos)
    out["text_proto_logits"] = self.text_head(out["text_pooled"], text_protos)
    return out
