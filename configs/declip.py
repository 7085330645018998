"""DeCLIP (Li et al., ICLR 2022): CLIP + SimSiam on two image views + MLM on the caption +
multi-view InfoNCE (2 views x {caption, EDA caption}) + nearest-neighbour supervision.

Variants (the part after ':' in --config=configs/declip.py:VARIANT):
  demo     the CLIP demo's towers, data, schedule and optimiser (gradients clipped at norm 1),
           plus DeCLIP's heads and augmentations.
  vit_b32  the official YFCC15M ViT-B/32 recipe (yfcc15m_vit_declip/config.yaml): batch 4096,
           AdamW (0.9, 0.98, eps 1e-8), weight decay 0.1, peak lr 1e-3 after 2,500 warmup steps,
           cosine to 0 at 128,001 steps, no gradient clipping, logit-scale parameter clamped to
           [3, 6] after each update (the forward pass caps exp of it at 100, its gradient kept),
           the patch embedding frozen at its initialisation (`freeze_conv1`), embed 512,
           ImageNet normalisation, loss weights 0.4 / 0.2 / 0.2 / 0.2, a 65,536-entry text queue.

The demo keeps the CLIP demo's logit-scale range [0, ln 100], trainable patch embedding and
gradient clipping, so that the two demos differ only in the objective and its views. (Clipping
did not change the DeCLIP demo: 300 steps, seeds 0-2, 12.7 / 14.5 / 11.9% zero-shot top-1 with
it, 13.8 / 14.4 / 12.3% without.)

Ablations are one flag: --config.declip.nns_weight=0 (and likewise simsiam/mlm/clip_weight).
"""

import ml_collections

from xclip_jax import config as cfglib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = cfglib.parse_variant(arg, default="demo", choices=("demo", "vit_b32"))
  config = cfglib.base_config()
  config.method = "declip"
  config.variant = variant

  if variant == "demo":
    cfglib.apply_demo(config)
    config.optim.grad_clip_norm = 1.0          # as the CLIP demo (configs/clip.py)
    config.declip.queue_size = 4096            # 16 steps of 2 x 128 captions
    config.declip.projector_hidden = 256
    config.declip.projector_dim = 256
    config.declip.predictor_hidden = 128
    return config

  cfglib.apply_paper_clip(config, patch_size=32)
  config.model.dtype = "float32"               # the official solver trains in fp32
  config.model.logit_scale_range = (3.0, 6.0)  # `logit_scale_param_value` clamp of the recipe
  config.model.image.freeze_patch_embed = True  # DeCLIP's ViTs: `freeze_conv1 = True`
  config.total_steps = 128_001
  config.batch_size = 4096
  config.optim.update(dict(lr=1e-3, min_lr=0.0, warmup_steps=2500, b1=0.9, b2=0.98, eps=1e-8,
                           weight_decay=0.1))
  config.data.name = "yfcc15m"                 # prepare it yourself: see README 'Your own data'
  config.data.text_key = "caption"
  config.data.mean, config.data.std = cfglib.IMAGENET_MEAN, cfglib.IMAGENET_STD
  config.data.view_crop_scale = (0.2, 1.0)
  config.data.flip = True
  config.declip.queue_size = 65_536
  return config
