"""xclip_jax: CLIP-family image-text pre-training in JAX/Flax.

`xclip_jax.load(workdir)` restores a trained model for notebooks and scripts (see xclip_jax.api);
it is imported on first use so that `import xclip_jax.<module>` stays light.
"""

__all__ = ["load", "LoadedModel"]


def __getattr__(name):
  if name in __all__:
    from xclip_jax import api  # noqa: PLC0415
    return getattr(api, name)
  raise AttributeError(f"module 'xclip_jax' has no attribute {name!r}")
