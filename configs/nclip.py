"""nCLIP ("Non-Contrastive Learning Meets Language-Image Pre-Training", Zhou et al., CVPR 2023):
each modality's pooled feature -> DINO-style head -> distribution over K shared prototypes; each
distribution supervises the other, with sharpness (per-sample entropy down) and smoothness
(global-batch mean entropy up) against collapse. CLIP's loss is logged, not trained.

Variants: demo (CPU, minutes; K = 256) and vit_b16 (the paper's likely setting: ViT-B/16,
batch 4096, K = 32768; the paper's exact hyper-parameters were not available, see README).
Every open choice is a config.nclip field; objectives/nclip.py documents the defaults.
nCLIP is evaluated through its prototype distributions (its CLIP head is never trained; xCLIP
reports both): see evaluate/spaces.py.
"""

import ml_collections

from xclip_jax import config as cfglib


def get_config(arg: str | None = None, method: str = "nclip") -> ml_collections.ConfigDict:
  variant = cfglib.parse_variant(arg, default="demo", choices=("demo", "vit_b16"))
  config = cfglib.base_config()
  config.method = method
  config.variant = variant
  if variant == "demo":
    cfglib.apply_demo(config)
    config.nclip.update(dict(prototypes=256, hidden=256, bottleneck=64))
    return config
  cfglib.apply_paper_clip(config, patch_size=16)
  config.batch_size = 4096
  config.optim.update(dict(lr=5e-4, weight_decay=0.5, warmup_steps=2000))   # SLIP's CLIP recipe
  return config
