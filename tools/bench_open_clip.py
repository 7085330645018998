"""open_clip's train step on the same synthetic data and architecture as `xclip_jax.bench`.

Runs in a separate environment with torch and open_clip_torch (not dependencies of this project):

  python -m venv /tmp/ocvenv && /tmp/ocvenv/bin/pip install torch torchvision open_clip_torch
  /tmp/ocvenv/bin/python tools/bench_open_clip.py --image_size=224 --patch_size=32 \
      --batch_size=32 --threads=2 --steps=5 [--device=cuda --dtype=bfloat16] [--json=out.json]

The architecture defaults are CLIP ViT-B/32 with this project's text vocabulary (configs/clip.py
:vit_b32): vision width 768 x 12 layers x 12 heads, text 512 x 12 x 8, context 77, embed 512,
QuickGELU. The step is what `xclip_jax.bench` times: forward of both towers, the symmetric InfoNCE
over the batch, backward, AdamW update (CLIP's betas and eps), on random images and token ids.
This file imports nothing from xclip_jax so it runs where TensorFlow and JAX are absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--patch_size", type=int, default=32)
  parser.add_argument("--vision_width", type=int, default=768)
  parser.add_argument("--vision_layers", type=int, default=12)
  parser.add_argument("--text_width", type=int, default=512)
  parser.add_argument("--text_layers", type=int, default=12)
  parser.add_argument("--text_heads", type=int, default=8)
  parser.add_argument("--context_length", type=int, default=77)
  parser.add_argument("--vocab_size", type=int, default=32_000)
  parser.add_argument("--embed_dim", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
  parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
  parser.add_argument("--device", default="cpu")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--json", default="")
  args = parser.parse_args()

  import open_clip
  import torch
  import torch.nn.functional as F

  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = open_clip.CLIP(
      embed_dim=args.embed_dim, quick_gelu=True,
      vision_cfg=open_clip.CLIPVisionCfg(
          layers=args.vision_layers, width=args.vision_width, head_width=64,
          patch_size=args.patch_size, image_size=args.image_size),
      text_cfg=open_clip.CLIPTextCfg(
          context_length=args.context_length, vocab_size=args.vocab_size,
          width=args.text_width, heads=args.text_heads, layers=args.text_layers)).to(args.device)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                weight_decay=0.2)
  generator = torch.Generator().manual_seed(0)
  images = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                       generator=generator).to(args.device)
  texts = torch.randint(1, args.vocab_size, (args.batch_size, args.context_length),
                        generator=generator).to(args.device)
  labels = torch.arange(args.batch_size, device=args.device)
  autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16,
                            enabled=args.dtype == "bfloat16")

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      image_emb, text_emb, scale = model(images, texts)
      logits = scale * image_emb @ text_emb.T
      loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())   # waits for the device, like block_until_ready

  for _ in range(2):
    step()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  result = dict(
      framework="open_clip", open_clip_version=open_clip.__version__,
      torch_version=torch.__version__, device=args.device, dtype=args.dtype,
      threads=torch.get_num_threads(), batch_size=args.batch_size,
      params=sum(p.numel() for p in model.parameters()),
      step_time_median_s=median, step_times_s=times, images_per_sec=args.batch_size / median)
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
