"""OpenAI CLIP's state-dict layout <-> xclip_jax's parameter tree, and the architecture in between.

OpenAI's `model.py` (and open_clip's OpenAI-compatible ViT models) name their weights
  visual.conv1.weight [width, 3, p, p]      visual.class_embedding [width]
  visual.positional_embedding [1 + g*g, width]  visual.ln_pre / ln_post.{weight,bias}
  visual.proj [width, embed]                visual.transformer.resblocks.N.<block>
  token_embedding.weight [vocab, width]     positional_embedding [context, width]
  transformer.resblocks.N.<block>           ln_final.{weight,bias}  text_projection [width, embed]
  logit_scale []
with <block> = ln_1, attn.in_proj_weight [3w, w] / in_proj_bias, attn.out_proj.{weight,bias}, ln_2,
mlp.c_fc.{weight,bias}, mlp.c_proj.{weight,bias}. torch Linear weights are [out, in]; ours are
[in, out] kernels, q/k/v split into heads, and the blocks stacked on a leading layer axis
(models/transformer.py). Every conversion here is a transpose or reshape, so both directions are
exact and their composition is the identity, bit for bit.

The state dict does not say everything: the head count (OpenAI uses width // 64; open_clip's
large towers 80-104 wide heads, see VISION_HEADS) and the activation (OpenAI's QuickGELU;
open_clip's non-`-quickgelu` models use exact GELU) come from defaults or the caller.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import numpy as np

HEAD_WIDTH = 64
# Vision widths whose open_clip towers do not use 64-wide heads (ViT-H-14: head_width 80,
# ViT-g-14: 88, ViT-bigG-14: 104; all 16 heads). Text towers use 64-wide heads throughout.
VISION_HEADS = {1280: 16, 1408: 16, 1664: 16}

# Keys OpenAI's TorchScript archives and older open_clip state dicts carry that are not weights.
IGNORED = re.compile(r"^(input_resolution|context_length|vocab_size)$|(^|\.)attn_mask$")

_VISUAL_BLOCKS, _TEXT_BLOCKS = "visual.transformer.resblocks.", "transformer.resblocks."


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _transpose(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.T)


# ---- one residual block: torch key -> (our path, torch -> ours, ours -> torch) -------------------

def _block_table(width: int, heads: int) -> dict[str, tuple[tuple[str, ...], Callable, Callable]]:
  head_dim = width // heads
  return {
      "ln_1.weight": (("ln_1", "scale"), _identity, _identity),
      "ln_1.bias": (("ln_1", "bias"), _identity, _identity),
      # [3w, w] rows (q | k | v, each heads x head_dim) -> [w, 3, heads, head_dim]
      "attn.in_proj_weight": (
          ("attn", "qkv_kernel"),
          lambda w: np.ascontiguousarray(
              w.reshape(3, heads, head_dim, width).transpose(3, 0, 1, 2)),
          lambda k: np.ascontiguousarray(k.transpose(1, 2, 3, 0).reshape(3 * width, width))),
      "attn.in_proj_bias": (("attn", "qkv_bias"), lambda b: b.reshape(3, heads, head_dim),
                            lambda b: b.reshape(3 * width)),
      # [w_out, w_in] with w_in = heads x head_dim -> [heads, head_dim, w_out]
      "attn.out_proj.weight": (("attn", "out_kernel"),
                               lambda w: np.ascontiguousarray(w.T.reshape(heads, head_dim, width)),
                               lambda k: np.ascontiguousarray(k.reshape(width, width).T)),
      "attn.out_proj.bias": (("attn", "out_bias"), _identity, _identity),
      "ln_2.weight": (("ln_2", "scale"), _identity, _identity),
      "ln_2.bias": (("ln_2", "bias"), _identity, _identity),
      "mlp.c_fc.weight": (("mlp", "fc", "kernel"), _transpose, _transpose),
      "mlp.c_fc.bias": (("mlp", "fc", "bias"), _identity, _identity),
      "mlp.c_proj.weight": (("mlp", "proj", "kernel"), _transpose, _transpose),
      "mlp.c_proj.bias": (("mlp", "proj", "bias"), _identity, _identity),
  }


def _conv_to_ours(w: np.ndarray) -> np.ndarray:     # [O, I, H, W] -> [H, W, I, O]
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _conv_to_torch(k: np.ndarray) -> np.ndarray:    # [H, W, I, O] -> [O, I, H, W]
  return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


# Top-level (non-block) weights: torch key -> (our path, torch -> ours, ours -> torch).
_TOWER_TABLE = {
    "visual.conv1.weight": (("image", "patch_embed", "kernel"), _conv_to_ours, _conv_to_torch),
    "visual.class_embedding": (("image", "class_embedding"), _identity, _identity),
    "visual.positional_embedding": (("image", "pos_embedding"), _identity, _identity),
    "visual.ln_pre.weight": (("image", "ln_pre", "scale"), _identity, _identity),
    "visual.ln_pre.bias": (("image", "ln_pre", "bias"), _identity, _identity),
    "visual.ln_post.weight": (("image", "ln_post", "scale"), _identity, _identity),
    "visual.ln_post.bias": (("image", "ln_post", "bias"), _identity, _identity),
    "visual.proj": (("image", "projection"), _identity, _identity),
    "token_embedding.weight": (("text", "token_embedding"), _identity, _identity),
    "positional_embedding": (("text", "pos_embedding"), _identity, _identity),
    "ln_final.weight": (("text", "ln_final", "scale"), _identity, _identity),
    "ln_final.bias": (("text", "ln_final", "bias"), _identity, _identity),
    "text_projection": (("text", "projection"), _identity, _identity),
    "logit_scale": (("logit_scale",), lambda x: x.reshape(()), lambda x: x.reshape(())),
}


# ---- architecture --------------------------------------------------------------------------------

def _num_layers(state: dict[str, np.ndarray], prefix: str) -> int:
  indices = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
  if not indices or indices != set(range(len(indices))):
    raise ValueError(f"No contiguous {prefix}N.* blocks in the state dict "
                     f"(found {sorted(indices)}).")
  return len(indices)


def mlp_ratio_for(width: int, hidden: int) -> float:
  """A float r with int(width * r) == hidden (what models/transformer.py computes)."""
  ratio = hidden / width
  if int(width * ratio) < hidden:        # hidden/width rounded down: step to the next float up
    ratio = math.nextafter(ratio, math.inf)
  if int(width * ratio) != hidden:
    raise ValueError(f"No float mlp_ratio gives hidden={hidden} for width={width}.")
  return ratio


def infer_architecture(state: dict[str, np.ndarray], *, vision_heads: int = 0,
                       text_heads: int = 0) -> dict[str, Any]:
  """config.model fields (embed_dim, image, text) implied by an OpenAI-layout state dict's shapes.

  Heads cannot be read from shapes: 0 means OpenAI's rule (width // 64; VISION_HEADS for
  open_clip's large towers).
  """
  missing = [k for k in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                         "token_embedding.weight", "positional_embedding", "text_projection")
             if k not in state]
  if missing:
    raise ValueError(
        f"Not an OpenAI-CLIP ViT state dict: missing {missing}. Supported: OpenAI's released ViT "
        "models and open_clip models with the same layout (ViT towers, built-in text "
        f"transformer). Keys present start with: {sorted(state)[:8]}")
  conv = state["visual.conv1.weight"]
  width, patch = int(conv.shape[0]), int(conv.shape[-1])
  grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
  if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
    raise ValueError("visual.positional_embedding is not 1 + a square number of positions.")
  text_width = int(state["ln_final.weight"].shape[0])
  image = dict(
      image_size=grid * patch, patch_size=patch, width=width,
      layers=_num_layers(state, _VISUAL_BLOCKS),
      heads=int(vision_heads or VISION_HEADS.get(width, max(width // HEAD_WIDTH, 1))),
      mlp_ratio=mlp_ratio_for(width, int(state[f"{_VISUAL_BLOCKS}0.mlp.c_fc.weight"].shape[0])))
  text = dict(
      context_length=int(state["positional_embedding"].shape[0]), width=text_width,
      layers=_num_layers(state, _TEXT_BLOCKS),
      heads=int(text_heads or max(text_width // HEAD_WIDTH, 1)),
      mlp_ratio=mlp_ratio_for(text_width,
                              int(state[f"{_TEXT_BLOCKS}0.mlp.c_fc.weight"].shape[0])),
      vocab_size=int(state["token_embedding.weight"].shape[0]), causal=True)
  for tower in (image, text):
    if tower["width"] % tower["heads"]:
      raise ValueError(f"width {tower['width']} is not divisible by heads={tower['heads']}.")
  return dict(embed_dim=int(state["text_projection"].shape[1]), image=image, text=text)


# ---- conversions ---------------------------------------------------------------------------------

def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def to_params(state: dict[str, np.ndarray], arch: dict[str, Any]) -> dict[str, Any]:
  """Our parameter tree (float32 numpy arrays) of an OpenAI-layout state dict."""
  state = {k: v for k, v in state.items() if not IGNORED.search(k)}
  used: set[str] = set()
  params: dict[str, Any] = {}

  def take(key: str) -> np.ndarray:
    if key not in state:
      raise ValueError(f"The state dict lacks {key}.")
    used.add(key)
    return np.asarray(state[key]).astype(np.float32)

  for key, (path, convert, _) in _TOWER_TABLE.items():
    _set(params, path, convert(take(key)))
  for tower, prefix in (("image", _VISUAL_BLOCKS), ("text", _TEXT_BLOCKS)):
    cfg = arch[tower]
    for suffix, (path, convert, _) in _block_table(cfg["width"], cfg["heads"]).items():
      layers = [convert(take(f"{prefix}{i}.{suffix}")) for i in range(cfg["layers"])]
      _set(params, (tower, "transformer", "blocks") + path, np.stack(layers))
  unknown = sorted(set(state) - used)
  if unknown:
    raise ValueError(
        f"{len(unknown)} weights have no place in xclip_jax's CLIP ViT ({unknown[:6]}...): this "
        "model has parts the OpenAI layout lacks (e.g. layer scale, attention pooling, a text "
        "tower from Hugging Face), which xclip_jax does not implement.")
  return params


def from_params(params: dict[str, Any]) -> dict[str, np.ndarray]:
  """The OpenAI-layout state dict (float32 numpy arrays) of our parameter tree (numpy or jax)."""
  state: dict[str, np.ndarray] = {}
  for key, (path, _, convert) in _TOWER_TABLE.items():
    state[key] = convert(np.asarray(_get(params, path), np.float32))
  for tower, prefix in (("image", _VISUAL_BLOCKS), ("text", _TEXT_BLOCKS)):
    blocks = params[tower]["transformer"]["blocks"]
    _, width, _, heads, _ = np.shape(blocks["attn"]["qkv_kernel"])   # [L, w, 3, heads, head_dim]
    for suffix, (path, _, convert) in _block_table(width, heads).items():
      stacked = np.asarray(_get(blocks, path), np.float32)
      for i, layer in enumerate(stacked):
        state[f"{prefix}{i}.{suffix}"] = convert(layer)
  return state
