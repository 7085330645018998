"""The methods: one module per method (clip.py, declip.py, ...), each defining `METHOD`.

The registry is this package's modules: every module here but `base` is a method, found by
`pkgutil` on first use, so adding a method adds a file and edits nothing shared. Shared code asks
the registry (`get_method(config.method)`) and never a method by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from flax import nnx

from xclip_jax.methods.base import Method

_NOT_METHODS = ("base",)        # modules of this package that hold shared pieces
_REGISTRY: dict[str, Method] = {}


def _discover() -> dict[str, Method]:
  """{name: Method} of every method module of this package (imported once, on first use)."""
  if not _REGISTRY:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
      if info.name in _NOT_METHODS or info.name.startswith("_"):
        continue
      module = importlib.import_module(f"{__name__}.{info.name}")
      method = getattr(module, "METHOD", None)
      if not isinstance(method, Method) or method.name != info.name:
        raise TypeError(f"{module.__name__} must define METHOD = base.Method({info.name!r}, "
                        "...): each module of xclip_jax/methods/ but base.py is one method.")
      found[info.name] = method
    _REGISTRY.update(found)
  return _REGISTRY


def names() -> tuple[str, ...]:
  """The registered methods' names, sorted."""
  return tuple(_discover())


def get_method(name: str) -> Method:
  methods = _discover()
  if name not in methods:
    raise ValueError(f"Unknown method {name!r}; registered: {sorted(methods)}.")
  return methods[name]


def build_model(config, *, eos_id: int, seed: int):
  """The model config.method needs (towers + that method's heads), initialised from `seed`."""
  return get_method(config.method).model(config, eos_id=eos_id, rngs=nnx.Rngs(seed))


def config_sections() -> dict[str, Any]:
  """{section: ConfigDict of its fields and defaults} of every method that has one, for the
  config schema (config.base_config). Methods may share a section (xCLIP reads nCLIP's)."""
  sections, owners = {}, {}
  for method in _discover().values():
    if not method.section:
      continue
    first = owners.setdefault(method.section, method)
    if first.defaults is not method.defaults:
      raise TypeError(f"Methods {first.name!r} and {method.name!r} declare different defaults "
                      f"for config.{method.section}: share one `defaults` function.")
    if method.section not in sections:
      sections[method.section] = method.defaults()
  return sections


def check_config(config) -> None:
  """Every method's checks of its section's values (a bad value is an error in any config)."""
  for method in _discover().values():
    method.check_config(config)


def option_paths() -> tuple[str, ...]:
  """The config paths of every method option (methods.base.Option): ways to compute the same
  loss and gradients, which a resumed run may change."""
  return tuple(sorted({o.path for m in _discover().values() for o in m.options}))


def check_options(config) -> None:
  """A method option set away from its neutral value that the method does not read is an error."""
  method = get_method(config.method)
  own = {option.path for option in method.options}
  for option in {o.path: o for m in _discover().values() for o in m.options}.values():
    section, key = option.path.split(".")
    value = config[section][key]
    if value != option.neutral and option.path not in own:
      offers = " ".join(o.offer for o in method.options)
      raise ValueError(f"config.{option.path}={value!r} has no effect on method "
                       f"{config.method!r} (it reads {', '.join(sorted(own)) or 'no such option'}"
                       f"); leave it at {option.neutral!r}. {offers}".rstrip())
