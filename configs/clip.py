"""CLIP: symmetric InfoNCE between an image tower and a text tower.

Variants (the part after ':' in --config=configs/clip.py:VARIANT):
  demo     tiny towers on the embedded `xclip_demo` dataset; trains on a laptop CPU in minutes.
  vit_b32  CLIP ViT-B/32 (Radford et al. 2021): 224px, patch 32, width 768 x 12 layers, embed 512,
           text 12 layers x width 512 x 8 heads, context 77.
  vit_b16  the same with 16px patches.
  vit_l14  CLIP ViT-L/14: width 1024 x 24 layers x 16 heads, patch 14, embed 768, text width 768
           x 12 layers x 12 heads (size a pod slice with `python -m xclip_jax.bench --steps=0`).

Paper-size variants clip no gradients (neither OpenAI's recipe nor open_clip's defaults do) and
clamp the logit-scale parameter to [0, ln 100] after each update. They read the TFDS dataset
named in `config.data` (none is bundled: see README).
The demo, a recipe of its own (lr 1e-3 after 50 warmup steps on tiny towers), clips the global
gradient norm at 1: at 600 steps over seeds 0-5 it reached 30.5% zero-shot top-1 on average
with clipping (median 33.0) and 28.3% without (median 29.2); see README, Measured.
Any field can be overridden on the command line: --config.optim.lr=3e-4.
"""

import ml_collections

from xclip_jax import config as cfglib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = cfglib.parse_variant(arg, default="demo", choices=("demo", "vit_b32", "vit_b16", "vit_l14"))
  config = cfglib.base_config()
  config.method = "clip"
  config.variant = variant

  if variant == "demo":
    cfglib.apply_demo(config)
    config.optim.grad_clip_norm = 1.0          # measured: see the module docstring
  elif variant == "vit_l14":
    cfglib.apply_paper_clip(config, patch_size=14)
    config.model.embed_dim = 768
    config.model.image.update(dict(width=1024, layers=24, heads=16))
    config.model.text.update(dict(width=768, heads=12))
  else:
    cfglib.apply_paper_clip(config, patch_size=32 if variant == "vit_b32" else 16)
  return config
