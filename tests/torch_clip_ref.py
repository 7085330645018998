"""An independent PyTorch reference of OpenAI CLIP's ViT model, run by tests/test_interop.py.

It runs under .venv-torch (Python 3.11 + torch CPU; see launch/venv.sh test), never under the
project's venv, and imports nothing from xclip_jax. The module layout is OpenAI's (`model.py` of
openai/CLIP), so `state_dict()` has exactly the keys of their released checkpoints:
visual.conv1.weight, visual.transformer.resblocks.N.attn.in_proj_weight, token_embedding.weight, ...

  .venv-torch/bin/python tests/torch_clip_ref.py SPEC.json OUT_DIR [WEIGHTS.safetensors]

SPEC.json: {"seed", "embed_dim", "image_size", "patch_size", "vision_width", "vision_layers",
"vision_heads", "context_length", "vocab_size", "text_width", "text_layers", "text_heads",
"images": path of a float32 [N, 3, H, W] .npy, "texts": path of an int64 [N, L] .npy}.
Without WEIGHTS, a random model (seeded) is saved to OUT_DIR as model.safetensors, model.pt
(torch.save of the state dict), model_openclip.pt (open_clip's training checkpoint: {"epoch",
"state_dict" with DataParallel's `module.` prefixes, "optimizer"}) and model_jit.pt
(torch.jit.script archive). With WEIGHTS, that file is loaded instead (load_state_dict, strict).
Either way OUT_DIR receives reference.npz (image_features, text_features: L2-normalised, float64
copies of the float32 outputs; logit_scale).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import OrderedDict

import numpy as np
import torch
from torch import nn


class QuickGELU(nn.Module):
  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
  def __init__(self, width: int, heads: int, causal_length: int):
    super().__init__()
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_1 = nn.LayerNorm(width)
    self.mlp = nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(width, width * 4)),
        ("gelu", QuickGELU()),
        ("c_proj", nn.Linear(width * 4, width)),
    ]))
    self.ln_2 = nn.LayerNorm(width)
    # Additive mask, -inf above the diagonal (text tower); an empty mask means none (image tower).
    # Non-persistent: OpenAI's state dicts do not hold it.
    if causal_length:
      mask = torch.full((causal_length, causal_length), float("-inf")).triu(1)
    else:
      mask = torch.zeros(0)
    self.register_buffer("attn_mask", mask, persistent=False)

  def attention(self, x: torch.Tensor) -> torch.Tensor:
    length = x.shape[0]
    if self.attn_mask.numel() > 0:
      return self.attn(x, x, x, need_weights=False,
                       attn_mask=self.attn_mask[:length, :length])[0]
    return self.attn(x, x, x, need_weights=False)[0]

  def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: [L, N, D] (sequence first)
    x = x + self.attention(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
  def __init__(self, width: int, layers: int, heads: int, causal_length: int = 0):
    super().__init__()
    self.resblocks = nn.Sequential(
        *[ResidualAttentionBlock(width, heads, causal_length) for _ in range(layers)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.resblocks(x)


class VisionTransformer(nn.Module):
  def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
               output_dim: int):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
    scale = width**-0.5
    self.class_embedding = nn.Parameter(scale * torch.randn(width))
    self.positional_embedding = nn.Parameter(
        scale * torch.randn((image_size // patch_size)**2 + 1, width))
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = Transformer(width, layers, heads)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: [N, 3, H, W]
    x = self.conv1(x)                                   # [N, width, g, g]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1],
                                                         dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
    x = self.ln_pre(x).permute(1, 0, 2)
    x = self.transformer(x).permute(1, 0, 2)
    return self.ln_post(x[:, 0, :]) @ self.proj


class CLIP(nn.Module):
  def __init__(self, spec: dict):
    super().__init__()
    self.visual = VisionTransformer(spec["image_size"], spec["patch_size"], spec["vision_width"],
                                    spec["vision_layers"], spec["vision_heads"],
                                    spec["embed_dim"])
    width = spec["text_width"]
    self.transformer = Transformer(width, spec["text_layers"], spec["text_heads"],
                                   spec["context_length"])
    self.token_embedding = nn.Embedding(spec["vocab_size"], width)
    self.positional_embedding = nn.Parameter(0.01 * torch.randn(spec["context_length"], width))
    self.ln_final = nn.LayerNorm(width)
    self.text_projection = nn.Parameter(width**-0.5 * torch.randn(width, spec["embed_dim"]))
    self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
    # Random (not default) norm parameters, so that a swapped scale/bias would show.
    with torch.no_grad():
      for module in self.modules():
        if isinstance(module, nn.LayerNorm):
          module.weight.normal_(1.0, 0.1)
          module.bias.normal_(0.0, 0.1)
        if isinstance(module, nn.MultiheadAttention):
          module.in_proj_bias.normal_(0.0, 0.1)
          module.out_proj.bias.normal_(0.0, 0.1)

  def encode_image(self, images: torch.Tensor) -> torch.Tensor:
    return self.visual(images)

  def encode_text(self, text: torch.Tensor) -> torch.Tensor:
    x = self.token_embedding(text) + self.positional_embedding[:text.shape[1]]
    x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = self.ln_final(x)
    # OpenAI pools at argmax(ids): <end_of_text> has the largest id of the vocabulary.
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

  def forward(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    image = self.encode_image(images)
    txt = self.encode_text(text)
    return (image / image.norm(p=2, dim=-1, keepdim=True),
            txt / txt.norm(p=2, dim=-1, keepdim=True))


def main(spec_path: str, out_dir: str, weights: str | None = None) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  torch.manual_seed(spec["seed"])
  model = CLIP(spec).eval()
  os.makedirs(out_dir, exist_ok=True)

  from safetensors.torch import load_file, save_file
  if weights:
    model.load_state_dict(load_file(weights), strict=True)
  else:
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(out_dir, "model.safetensors"))
    torch.save(state, os.path.join(out_dir, "model.pt"))
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"epoch": 1, "name": "tiny",
                "state_dict": OrderedDict(("module." + k, v) for k, v in state.items()),
                "optimizer": optimizer.state_dict()}, os.path.join(out_dir, "model_openclip.pt"))
    torch.jit.script(model).save(os.path.join(out_dir, "model_jit.pt"))

  images = torch.from_numpy(np.load(spec["images"]))
  texts = torch.from_numpy(np.load(spec["texts"]))
  with torch.no_grad():
    image_features, text_features = model(images, texts)
  np.savez(os.path.join(out_dir, "reference.npz"),
           image_features=image_features.double().numpy(),
           text_features=text_features.double().numpy(),
           logit_scale=model.logit_scale.detach().double().numpy())


if __name__ == "__main__":
  main(*sys.argv[1:4])
