"""SigLIP (Zhai et al., ICCV 2023): the pairwise sigmoid loss with a learnable temperature
(t' = log 10) and bias (b = -10). --config.siglip.impl=ring computes it with a shard_map ring of
text chunks (memory for very large batches; same value and gradients).

Variants: demo (CPU, minutes) and vit_b16 (224px, batch 32k as in the paper's B/16 runs)."""

import ml_collections

from xclip_jax import config as cfglib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = cfglib.parse_variant(arg, default="demo", choices=("demo", "vit_b16"))
  config = cfglib.base_config()
  config.method = "siglip"
  config.variant = variant
  config.model.logit_scale_max = 1e6       # SigLIP does not clamp its temperature
  if variant == "demo":
    cfglib.apply_demo(config)
    return config
  cfglib.apply_paper_clip(config, patch_size=16)
  config.optim.update(dict(lr=1e-3, weight_decay=1e-4, b2=0.95))
  return config
