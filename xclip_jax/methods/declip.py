"""DeCLIP (Li et al., ICLR 2022): CLIP + SimSiam on two image views + MLM on the caption +
multi-view InfoNCE (2 views x {caption, EDA caption}) + nearest-neighbour supervision from a
queue of text embeddings kept in the train state."""

from __future__ import annotations

from xclip_jax.data import views as views_lib
from xclip_jax.methods import base
from xclip_jax.objectives import declip, mlm, nns


def prepare(batch, rng, config, text_spec):
  """Masks the caption for MLM; its unmasked ids become the MLM targets."""
  masked, targets, weights = mlm.mask_tokens(
      rng, batch["text"], mask_id=text_spec["mask_id"],
      special_ids=(text_spec["pad_id"], text_spec["eos_id"], text_spec["mask_id"]),
      first_regular_id=text_spec["first_regular_id"], vocab_size=text_spec["vocab_size"],
      probability=config.declip.mlm_probability)
  return dict(batch, text=masked, mlm_targets=targets, mlm_weights=weights)


def objective(outputs, batch, config, method_state):
  weights = {"clip_loss": config.declip.clip_weight, "simsiam_loss": config.declip.simsiam_weight,
             "mlm_loss": config.declip.mlm_weight, "nns_loss": config.declip.nns_weight}
  pair_loss, image_to_text = base.contrastive(config)
  return declip.declip_loss(outputs, batch["mlm_targets"], batch["mlm_weights"], method_state,
                            weights, pair_loss=pair_loss, image_to_text=image_to_text)


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

METHOD = base.Method("declip", objective, views=VIEWS, prepare=prepare, init_state=init_state,
                     state_specs=state_specs, constrain_params=base.clamp_logit_scale,
                     options=(base.CHUNKED,))
