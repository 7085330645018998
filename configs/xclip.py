"""xCLIP: CLIP and nCLIP trained together on shared towers,
total = nclip.clip_weight * CLIP + nclip.nclip_weight * nCLIP (0.3 / 0.7 by default, from a
third-party summary of the paper; --config.nclip.clip_weight=1 --config.nclip.nclip_weight=1 is the
obvious ablation). Variants as configs/nclip.py: demo, vit_b16."""

import ml_collections

from configs import nclip as nclip_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return nclip_config.get_config(arg, method="xclip")
