"""Embedded TFDS builders (the demo dataset); importing this package registers them with TFDS
(e.g. `xclip_demo`). Converted datasets need no builder: data/pairs/pair_dataset.py."""

from xclip_jax.data.builders import xclip_demo  # noqa: F401  (registration happens on import)
