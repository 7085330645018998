"""Image arithmetic that runs on the accelerator, inside jitted functions, on uint8 batches.

The host pipeline does only what needs the encoded bytes (decode the crop window, resize) and
sends uint8 pixels; per-pixel work happens here as pure jnp functions.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """0..255 pixels (uint8 or float) -> float32 (x / 255 - mean) / std; mean/std per channel in
  [0, 1] units (CLIP's or ImageNet's statistics)."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
