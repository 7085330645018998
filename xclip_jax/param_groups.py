"""Parameter groups of the optimiser: which parameters are frozen, and the learning-rate
multiplier of every other one. Paths are '/'-joined parameter names, e.g.
`image/transformer/blocks/mlp/fc/kernel` (scanned blocks: one array per name, leading axis the
layer).

Frozen parameters (label FROZEN) get no update, no weight decay, no optimizer state and no share
of gradient clipping (optim.make_optimizer sends them to optax.set_to_zero through
optax.multi_transform), and the train step stops the gradient at them, so no backward pass is
computed into them (a locked tower costs its forward pass only). They are
  config.model.image.freeze_patch_embed  image/patch_embed (DeCLIP's `freeze_conv1`)
  config.optim.locked_tower              'image': everything under image/, its projection
                                         included (LiT; big_vision's 'img/.*' freeze, open_clip's
                                         --lock-image); 'text': everything under text/
  config.optim.lr_mults                  a parameter whose multiplier is 0
The logit scale (and SigLIP's bias) and the methods' heads are outside the towers: they train.

Multipliers scale a parameter's whole step; a parameter's is the product of
  config.optim.lr_mults     ((regex, mult), ...): the first regex that fullmatches the path
                            (big_vision's lr_mults; open_clip's parameter groups)
  config.optim.layer_decay  d < 1, the image tower's layer-wise decay, BEiT's layer ids (0 the
                            embeddings, i + 1 block i, L + 1 the head; multiplier d^(L + 1 - id)):
                            block i of L gets d^(L - i), the embeddings (patch, class, position,
                            ln_pre) d^(L + 1), ln_post and the projection 1. The scanned blocks'
                            rows get their own factors: the multiplier is an (L, 1, ...) array
                            broadcasting over the stacked update. The text tower and the heads
                            outside the towers get 1.
How a multiplier meets weight decay is the decay convention's (optim.py).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

TRAINABLE, FROZEN = "trainable", "frozen"
TOWERS = ("image", "text")

# The ViT's parameters (models/vit.py) by layer-decay group. Any other image parameter is an
# error, so a new one cannot silently train at the wrong rate.
VIT_EMBEDDINGS = ("patch_embed", "class_embedding", "pos_embedding", "ln_pre")
VIT_BLOCKS = "transformer"               # ScannedBlocks: every leaf's leading axis is the layer
VIT_HEAD = ("ln_post", "projection")


def path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def path_name(path) -> str:
  return "/".join(path_names(path))


def locked_tower(optim: ml_collections.ConfigDict) -> str:
  """`optim.locked_tower`, checked: '' (nothing locked) or one of TOWERS."""
  tower = optim.get("locked_tower", "")
  if tower not in ("", *TOWERS):
    raise ValueError(f"config.optim.locked_tower={tower!r} is not a tower: use "
                     f"{' or '.join(map(repr, TOWERS))}, or '' to train both "
                     "(e.g. --config.optim.locked_tower=image).")
  return tower


def lr_mult_rules(optim: ml_collections.ConfigDict) -> tuple[tuple[str, float], ...]:
  """`optim.lr_mults` as ((pattern, multiplier), ...), checked.

  An entry is a (pattern, multiplier) pair (config files; a saved config's JSON lists) or a
  'pattern=multiplier' string (the command line: --config.optim.lr_mults='image/.*=0.1'; the
  multiplier follows the last '=')."""
  rules = []
  for entry in tuple(optim.get("lr_mults", ())):
    if isinstance(entry, str) and "=" in entry:
      pattern, mult = entry.rsplit("=", 1)
    elif isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str):
      pattern, mult = entry
    else:
      raise ValueError(f"config.optim.lr_mults entry {entry!r}: use (pattern, multiplier) pairs, "
                       "or 'pattern=multiplier' strings on the command line "
                       "(--config.optim.lr_mults='image/.*=0.1', repeated for more).")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"config.optim.lr_mults pattern {pattern!r} is not a regular expression: "
                       f"{e}.") from e
    try:
      value = float(mult) if not isinstance(mult, bool) else math.nan
    except ValueError:
      value = math.nan
    if not math.isfinite(value) or value < 0:
      raise ValueError(f"config.optim.lr_mults: the multiplier of {pattern!r} is {mult!r}; use a "
                       "number >= 0 (0 freezes the parameters it matches).")
    rules.append((pattern, value))
  return tuple(rules)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The checks that need no parameters (config.validate runs them before anything compiles)."""
  tower = locked_tower(config.optim)
  lr_mult_rules(config.optim)
  decay = config.optim.get("layer_decay", 1.0)
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"config.optim.layer_decay={decay} must be in (0, 1]; 1 turns it off.")
  if decay < 1.0 and tower == "image":
    raise ValueError(f"config.optim.layer_decay={decay} scales the image tower, which "
                     "config.optim.locked_tower='image' locks: drop one of them.")


def frozen_paths(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """'/'-joined parameter path prefixes the config freezes."""
  paths = []
  if config.model.image.get("freeze_patch_embed", False):
    paths.append("image/patch_embed")         # DeCLIP's ViTs (`freeze_conv1`)
  if locked_tower(config.optim):
    paths.append(locked_tower(config.optim))   # LiT: the whole tower
  return tuple(paths)


def _first_match(name: str, rules) -> int | None:
  return next((i for i, (pattern, _) in enumerate(rules) if re.fullmatch(pattern, name)), None)


def parameter_labels(params: Any, frozen: tuple[str, ...],
                     rules: tuple[tuple[str, float], ...] = ()) -> Any:
  """FROZEN for every parameter under a prefix in `frozen` or whose first matching rule has
  multiplier 0; TRAINABLE otherwise.

  A prefix or a pattern that matches no parameter is an error (a typo would otherwise train what
  it meant to freeze), and so is a pattern whose every match an earlier pattern or a frozen
  prefix already takes (it would do nothing)."""
  prefixes = [tuple(p.strip("/").split("/")) for p in frozen]
  used_prefixes, matched, won = set(), set(), set()

  def label(path, _):
    names = path_names(path)
    under = [p for p in prefixes if names[:len(p)] == p]
    used_prefixes.update(under)
    name = "/".join(names)
    matched.update(i for i, (pattern, _) in enumerate(rules) if re.fullmatch(pattern, name))
    if under:
      return FROZEN
    first = _first_match(name, rules)
    if first is None:
      return TRAINABLE
    won.add(first)
    return FROZEN if rules[first][1] == 0 else TRAINABLE

  labels = jax.tree_util.tree_map_with_path(label, params)
  unused = ["/".join(p) for p in prefixes if p not in used_prefixes]
  if unused:
    raise ValueError(f"Frozen parameter path(s) {unused} match no parameter of the model.")
  nothing = [rules[i][0] for i in range(len(rules)) if i not in matched]
  if nothing:
    # 'a=0.1,b=0' in one flag reads as the pattern 'a=0.1,b' (the multiplier after the last '=').
    several = any("=" in p for p in nothing)
    raise ValueError(f"config.optim.lr_mults pattern(s) {nothing} match no parameter path "
                     "(fullmatch of '/'-joined names, e.g. 'image/transformer/.*')" +
                     (": give one 'pattern=multiplier' per flag, e.g. --config.optim.lr_mults="
                      "'text/.*=0.1' --config.optim.lr_mults='logit_scale=0'." if several
                      else "."))
  shadowed = [rules[i][0] for i in range(len(rules)) if i in matched and i not in won]
  if shadowed:
    raise ValueError(f"config.optim.lr_mults pattern(s) {shadowed} only match parameters that an "
                     "earlier pattern (the first match wins) or a locked/frozen path already "
                     "takes: reorder or remove them.")
  return labels


def labels_of(config: ml_collections.ConfigDict, params: Any) -> Any:
  """parameter_labels for what `config` freezes."""
  return parameter_labels(params, frozen_paths(config), lr_mult_rules(config.optim))


def _layer_decay_factor(names: tuple[str, ...], shape: tuple[int, ...], decay: float,
                        layers: int) -> float | np.ndarray:
  if names[0] != "image":
    return 1.0
  group = names[1] if len(names) > 1 else ""
  if group in VIT_EMBEDDINGS:
    return decay ** (layers + 1)
  if group in VIT_HEAD:
    return 1.0
  if group == VIT_BLOCKS:
    if not shape or shape[0] != layers:
      raise ValueError(f"{'/'.join(names)} has shape {shape}: expected the scanned blocks' "
                       f"leading layer axis of config.model.image.layers={layers}.")
    rows = decay ** (layers - np.arange(layers, dtype=np.float64))
    return rows.astype(np.float32).reshape((layers,) + (1,) * (len(shape) - 1))
  raise ValueError(f"config.optim.layer_decay: image parameter {'/'.join(names)} is in no group "
                   f"(embeddings {VIT_EMBEDDINGS}, blocks {VIT_BLOCKS!r}, head {VIT_HEAD}); "
                   "add it to param_groups.py.")


def lr_multipliers(config: ml_collections.ConfigDict, params: Any
                   ) -> dict[str, float | np.ndarray] | None:
  """{path: multiplier} of every trainable parameter (a float, or for scanned blocks under layer
  decay a float32 array broadcasting over the stacked parameter), or None when every multiplier
  is 1 (the optimiser then keeps optax.adamw's plain state)."""
  rules = lr_mult_rules(config.optim)
  decay = float(config.optim.get("layer_decay", 1.0))
  layers = int(config.model.image.layers)
  labels = labels_of(config, params)
  out = {}
  for (path, leaf), label in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree.leaves(labels)):
    if label == FROZEN:
      continue
    names = path_names(path)
    first = _first_match("/".join(names), rules)
    mult = 1.0 if first is None else rules[first][1]
    if decay != 1.0:
      mult = mult * _layer_decay_factor(names, tuple(leaf.shape), decay, layers)
    out["/".join(names)] = mult
  if all(np.all(np.asarray(m) == 1.0) for m in out.values()):
    return None
  return out


def scale_by_multipliers(multipliers: dict[str, float | np.ndarray]
                         ) -> optax.GradientTransformation:
  """Multiplies each update by multipliers[its path]. Under optax.multi_transform it sees the
  trainable subtree, frozen leaves being empty MaskedNodes: the paths stay the same."""

  def scale(updates, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * jnp.asarray(multipliers[path_name(path)], u.dtype), updates)

  return optax.stateless(scale)


def stop_frozen_gradients(config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """params -> params with jax.lax.stop_gradient on every frozen leaf (identity when nothing is
  frozen). The gradient of a locked tower is then a symbolic zero: JAX emits no backward pass
  for it, and XLA keeps none of its activations for one."""
  if not frozen_paths(config) and not any(m == 0 for _, m in lr_mult_rules(config.optim)):
    return lambda params: params

  def stop(params):
    return jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p,
                        params, labels_of(config, params))
  return stop
