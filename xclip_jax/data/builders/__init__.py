"""Embedded TFDS builders; importing this package registers them with TFDS (e.g. `xclip_demo`)."""

from xclip_jax.data.builders import xclip_demo  # noqa: F401  (registration happens on import)
