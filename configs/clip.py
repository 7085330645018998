"""CLIP: symmetric InfoNCE between an image tower and a text tower.

Variants (the part after ':' in --config=configs/clip.py:VARIANT):
  demo     tiny towers on the embedded `xclip_demo` dataset; trains on a laptop CPU in minutes.
  vit_b32  CLIP ViT-B/32 (Radford et al. 2021): 224px, patch 32, width 768 x 12 layers, embed 512,
           text 12 layers x width 512 x 8 heads, context 77.
  vit_b16  the same with 16px patches.

Paper-size variants read the TFDS dataset named in `config.data` (none is bundled: see README).
Any field can be overridden on the command line: --config.optim.lr=3e-4.
"""

import ml_collections

from xclip_jax import config as cfglib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = cfglib.parse_variant(arg, default="demo", choices=("demo", "vit_b32", "vit_b16"))
  config = cfglib.base_config()
  config.method = "clip"
  config.variant = variant

  if variant == "demo":
    cfglib.apply_demo(config)
  else:
    cfglib.apply_paper_clip(config, patch_size=32 if variant == "vit_b32" else 16)
  return config
