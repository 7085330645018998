"""SigLIP (Zhai et al., ICCV 2023): the pairwise sigmoid loss with a learnable temperature
(t' = log 10) and bias (b = -10). --config.siglip.impl=ring computes it with a shard_map ring of
text chunks (memory for very large batches; same value and gradients).

Weight decay as big_vision's trainer applies it (config.optim.decay_convention=big_vision): each
step shrinks the kernels by weight_decay x lr(t) / lr, not by lr(t) x weight_decay as optax.adamw
does, and only kernels decay (big_vision's default wd_mults '.*/kernel$': no embedding tables).

Both variants clip gradients at norm 1, as big_vision's configs do. Variants: demo (CPU, minutes;
weight decay 1e-4 per step at the peak, what the other demos' AdamW 0.1 x lr 1e-3 gives) and
vit_b16 (224px, batch 32k as in the paper's B/16 runs; wd 1e-4, beta2 0.95)."""

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
  else:
    cfglib.apply_paper_clip(config, patch_size=16)
    config.optim.update(dict(lr=1e-3, weight_decay=1e-4, b2=0.95, eps=1e-8))
  config.optim.decay_convention = "big_vision"
  config.optim.grad_clip_norm = 1.0        # big_vision's SigLIP configs clip at norm 1
  if variant == "demo":
    config.optim.weight_decay = 1e-4
  config.optim.no_decay = tuple(config.optim.no_decay) + ("pos_embedding", "token_embedding")
  return config
