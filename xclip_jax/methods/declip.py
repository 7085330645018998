"""DeCLIP (Li et al., ICLR 2022): CLIP + SimSiam on two image views + MLM on the caption +
multi-view InfoNCE (2 views x {caption, EDA caption}) + nearest-neighbour supervision from a
queue of text embeddings kept in the train state."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
from flax import nnx

from xclip_jax.data import views as views_lib
from xclip_jax.methods import base
from xclip_jax.models import heads, transformer
from xclip_jax.models.two_tower import TwoTower, interleave, l2_normalize, split_views
from xclip_jax.objectives import declip, mlm, nns


def defaults() -> ml_collections.ConfigDict:
  """config.declip: the loss weights, MLM, the NNS queue and the SimSiam head sizes."""
  c = ml_collections.ConfigDict()
  c.clip_weight = 0.4               # the 4-pair multi-view InfoNCE (includes CLIP's pair)
  c.simsiam_weight = 0.2            # image self-supervision
  c.mlm_weight = 0.2                # text self-supervision
  c.nns_weight = 0.2                # nearest-neighbour supervision
  c.mlm_probability = 0.15
  c.queue_size = 65_536             # NNS FIFO queue of text embeddings (global)
  c.projector_hidden = 1024         # SimSiam projector: embed -> 1024 -> 1024 -> projector_dim
  c.projector_dim = 1024
  c.predictor_hidden = 512          # SimSiam predictor: projector_dim -> 512 -> projector_dim
  return c


class DeclipModel(TwoTower):
  """The CLIP towers plus a SimSiam projector/predictor on the image embedding and an MLM head on
  the text tokens. `model_cfg` is config.model; `declip_cfg` is config.declip (head sizes).

  One forward pass per tower serves both views (`interleave`)."""

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


def model(config, *, eos_id: int, rngs: nnx.Rngs) -> DeclipModel:
  return DeclipModel(config.model, config.declip, eos_id=eos_id, rngs=rngs)


def prepare(batch, rng, config, text_spec):
  """Masks the caption for MLM; its unmasked ids become the MLM targets."""
  masked, targets, weights = mlm.mask_tokens(
      rng, batch["text"], mask_id=text_spec.mask_id, special_ids=text_spec.special_ids,
      first_regular_id=text_spec.first_regular_id, vocab_size=text_spec.vocab_size,
      probability=config.declip.mlm_probability)
  return dict(batch, text=masked, mlm_targets=targets, mlm_weights=weights)


def objective(outputs, batch, config, method_state):
  weights = {"clip_loss": config.declip.clip_weight, "simsiam_loss": config.declip.simsiam_weight,
             "mlm_loss": config.declip.mlm_weight, "nns_loss": config.declip.nns_weight}
  pair_loss, image_to_text = base.contrastive(config)
  loss, metrics, queue = declip.declip_loss(
      outputs, batch["mlm_targets"], batch["mlm_weights"], method_state, weights,
      pair_loss=pair_loss, image_to_text=image_to_text)
  return loss, dict(metrics, logit_scale=outputs["logit_scale"]), queue


def init_state(config, rng):
  return nns.init_queue(rng, config.declip.queue_size, config.model.embed_dim)


def state_specs(config):
  del config
  return {"queue": base.ROWS, "ptr": base.P()}


# Two MoCo v2 views of each image; the caption and its EDA variant.
VIEWS = views_lib.Views(
    image=(views_lib.ImageView("image", crop="ssl", augment="moco"),
           views_lib.ImageView("image2", crop="ssl", augment="moco")),
    text=(views_lib.TextView("text"), views_lib.TextView("text_aug", eda=True)))

METHOD = base.Method("declip", model, objective, views=VIEWS, section="declip",
                     defaults=defaults, prepare=prepare, init_state=init_state,
                     state_specs=state_specs, constrain_params=base.clamp_logit_scale,
                     options=(base.CHUNKED,))
