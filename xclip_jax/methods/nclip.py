"""nCLIP (Zhou et al., CVPR 2023): each modality's distribution over K shared prototypes
supervises the other's, with sharpness and smoothness regularisers. CLIP's loss is logged, not
trained, so nCLIP is scored through its prototypes (evaluate/spaces.py)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from xclip_jax.methods import base
from xclip_jax.models import heads, transformer
from xclip_jax.models.two_tower import TwoTower
from xclip_jax.objectives import nclip


def defaults() -> ml_collections.ConfigDict:
  """config.nclip (read by nCLIP and xCLIP); objectives/nclip.py gives each choice's reason."""
  c = ml_collections.ConfigDict()
  c.prototypes = 32_768              # K, the paper recipe's prototype count
  c.hidden = 2048                    # DINO-style head: MLP width,
  c.bottleneck = 256                 #   bottleneck before the prototypes,
  c.layers = 3                       #   and depth
  c.shared_prototypes = True         # p_v and p_t must index the same clusters to agree
  c.image_temp = 0.1                 # DINO student / MSN anchor temperature
  c.text_temp = 0.1
  c.target_temp = 0.05               # sharpened targets (DINO teacher 0.04-0.07)
  c.stop_gradient_targets = True     # targets are constants, as in DINO/MSN/SwAV
  c.sharp_weight = 0.1               # per-sample entropy; 1.0 overpowers smoothness (tests)
  c.smooth_weight = 1.0              # log K - H(mean p) (MSN memax_weight default)
  c.clip_weight = 0.3                # xCLIP: w_clip * CLIP + w_nclip * nCLIP (0.3 / 0.7,
  c.nclip_weight = 0.7               #   a third-party summary of the paper)
  return c


class NclipModel(TwoTower):
  """The CLIP towers plus a prototype head per modality on the pooled features (image class
  token, text end-of-text token), with one prototype matrix shared by both heads
  (config.nclip.shared_prototypes) so that p_v and p_t index the same K clusters.

  Its "prototypes" feature space scores as the loss learns: an image gives log p_v (temperature
  config.nclip.image_temp), a text its target distribution q_t (config.nclip.target_temp), and
  their dot product Σ_k q_t(k) log p_v(k) = -H(q_t, p_v) is the image half of nCLIP's alignment
  term for that pair (evaluate/spaces.py). xCLIP uses the same model."""

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
    self.image_temp = float(nclip_cfg["image_temp"])
    self.target_temp = float(nclip_cfg["target_temp"])

  feature_spaces = TwoTower.feature_spaces + ("prototypes",)

  def _prototype_logits(self, pooled: jax.Array, modality: str) -> jax.Array:
    image_protos = self.image_prototypes[...]
    if modality == "image":
      return self.image_head(pooled, image_protos)
    text_protos = image_protos if self.shared_prototypes else self.text_prototypes[...]
    return self.text_head(pooled, text_protos)

  def _space(self, tower_out: dict[str, jax.Array], space: str, modality: str) -> jax.Array:
    if space != "prototypes":
      return super()._space(tower_out, space, modality)
    logits = self._prototype_logits(tower_out["pooled"], modality).astype(jnp.float32)
    if modality == "image":
      return jax.nn.log_softmax(logits / self.image_temp, axis=-1)
    return jax.nn.softmax(logits / self.target_temp, axis=-1)

  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = True
               ) -> dict[str, jax.Array]:
    out = super().__call__(batch, train=train)
    out["image_proto_logits"] = self._prototype_logits(out["image_pooled"], "image")
    out["text_proto_logits"] = self._prototype_logits(out["text_pooled"], "text")
    return out


def model(config, *, eos_id: int, rngs: nnx.Rngs) -> NclipModel:
  return NclipModel(config.model, config.nclip, eos_id=eos_id, rngs=rngs)


def nclip_terms(outputs, config):
  """nCLIP's loss and metrics as config.nclip sets them (xCLIP adds CLIP's loss to them)."""
  c = config.nclip
  return nclip.nclip_loss(outputs["image_proto_logits"], outputs["text_proto_logits"],
                          image_temp=c.image_temp, text_temp=c.text_temp,
                          target_temp=c.target_temp, stop_gradient_targets=c.stop_gradient_targets,
                          sharp_weight=c.sharp_weight, smooth_weight=c.smooth_weight)


def objective(outputs, batch, config, method_state):
  del batch
  loss, metrics = nclip_terms(outputs, config)
  # CLIP's loss is logged (not trained) to show that nCLIP's CLIP head stays untrained.
  pair_loss, _ = base.contrastive(config)
  clip_value, _ = pair_loss(jax.lax.stop_gradient(outputs["image_emb"]),
                            jax.lax.stop_gradient(outputs["text_emb"]),
                            jax.lax.stop_gradient(outputs["logit_scale"]))
  return loss, {"nclip_loss": loss, "clip_loss_untrained": clip_value,
                "logit_scale": outputs["logit_scale"], **metrics}, method_state


# nCLIP never trains its CLIP head: it is scored through its prototype distributions and probed
# on the pooled image features.
METHOD = base.Method("nclip", model, objective, section="nclip", defaults=defaults,
                     constrain_params=base.clamp_logit_scale, options=(base.CHUNKED,),
                     scoring_spaces=("prototypes",), probe_space="pooled")
