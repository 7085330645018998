"""SLIP (Mu et al., ECCV 2022): CLIP on one view plus SimCLR (NT-Xent, temperature 0.1, global
batch) on two augmented views, through a 4096-4096-256 projection head on the ViT's class token.

Variants: demo (CPU, minutes; a 512-512-128 head) and vit_b16 (SLIP's YFCC15M recipe: batch 4096,
lr 3e-3, weight decay 0.1, no gradient clipping, ImageNet normalisation, SSL crops of scale
(0.08, 1)). The CLIP view is a plain crop without flip (its declared view, methods/slip.py); the
logit-scale parameter is clamped to [0, ln 100] after each step, as SLIP's main.py does."""

import ml_collections

from xclip_jax import config as cfglib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = cfglib.parse_variant(arg, default="demo", choices=("demo", "vit_b16"))
  config = cfglib.base_config()
  config.method = "slip"
  config.variant = variant
  config.data.view_crop_scale = (0.08, 1.0)
  if variant == "demo":
    cfglib.apply_demo(config)
    config.slip.update(dict(mlp_dim=512, embed_dim=128))
    return config
  cfglib.apply_paper_clip(config, patch_size=16)
  config.batch_size = 4096
  config.optim.update(dict(lr=3e-3, weight_decay=0.1, eps=1e-8))
  config.data.mean, config.data.std = cfglib.IMAGENET_MEAN, cfglib.IMAGENET_STD
  config.data.crop_scale = (0.5, 1.0)
  return config
