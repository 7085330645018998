"""Import OpenAI-CLIP / open_clip ViT checkpoints as xclip_jax workdirs, and export them back.

Import (safetensors, torch.save state dicts incl. open_clip's {"state_dict": ...} checkpoints, or
OpenAI's TorchScript archives such as ViT-B-32.pt; no PyTorch needed, no pickled code run):
  python -m xclip_jax.interop.convert --input=ViT-B-32.pt --workdir=W \
      --bpe_vocab=bpe_simple_vocab_16e6.txt.gz [--activation=quick_gelu|gelu] \
      [--vision_heads=N --text_heads=N] [--config=configs/clip.py:vit_b32 --config.k=v ...]
writes W/checkpoints/0 (the parameters and the config) that the usual tools read:
  python -m xclip_jax.evaluate --workdir=W --config.evals.zeroshot.dataset=...
  python -m xclip_jax.main --config=configs/finetune.py:W --workdir=W2 ...   (fine-tuning)
The architecture comes from the weights' shapes; heads default to OpenAI's width // 64 and the
activation to OpenAI's QuickGELU (open_clip models whose name lacks `-quickgelu` and that were
trained by LAION etc. use --activation=gelu). --config supplies everything else (data, evals,
optimiser); the model fields are always the checkpoint's.

Export (OpenAI key layout, loadable by open_clip and OpenAI's model.py `build_model`):
  python -m xclip_jax.interop.convert --export --workdir=W --output=model.safetensors \
      [--step=N] [--dtype=float32|float16] [--ema]   (--ema: the parameters' moving average)
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402



def imported_config(arch: dict, *, base=None, activation: str = "quick_gelu", bpe_vocab: str = ""):
  """`base` (default: base_config()) with the imported model's fields and its tokenizer."""
  from xclip_jax import config as config_lib
  config = base if base is not None else config_lib.base_config()
  defaults = config_lib.base_config()
  config.method = "clip"                  # the towers alone: method heads would start untrained
  config.variant = "imported"
  config.model.embed_dim = arch["embed_dim"]
  config.model.image.update(arch["image"])
  config.model.text.update(arch["text"])
  config.model.activation = activation
  config.data.mean, config.data.std = defaults.data.mean, defaults.data.std   # OpenAI's statistics
  config.evals.transform = "openai"       # OpenAI's / open_clip's eval preprocessing, exactly
  config.tokenizer.kind = "clip_bpe"
  config.tokenizer.path = os.path.abspath(os.path.expanduser(bpe_vocab)) if bpe_vocab else ""
  config.tokenizer.train_if_missing = False
  config.init_from = ""
  return config


def import_checkpoint(input_path: str, workdir: str, *, bpe_vocab: str = "",
                      activation: str = "quick_gelu", vision_heads: int = 0, text_heads: int = 0,
                      base_config=None):
  """Reads `input_path`, writes `workdir` (checkpoint step 0 + config); returns the config."""
  from xclip_jax import checkpoint
  from xclip_jax.interop import openai_layout, torch_files

  if os.path.exists(checkpoint.checkpoint_dir(workdir)):
    raise FileExistsError(f"{checkpoint.checkpoint_dir(workdir)} exists: import into a new "
                          "workdir.")
  state = torch_files.read_checkpoint(input_path)
  arch = openai_layout.infer_architecture(state, vision_heads=vision_heads, text_heads=text_heads)
  params = openai_layout.to_params(state, arch)
  config = imported_config(arch, base=base_config, activation=activation, bpe_vocab=bpe_vocab)
  if bpe_vocab:
    from xclip_jax.data import clip_bpe
    tokenizer = clip_bpe.ClipBpeTokenizer(config.tokenizer.path)
    if tokenizer.vocab_size != arch["text"]["vocab_size"]:
      raise ValueError(f"The BPE vocabulary {bpe_vocab} has {tokenizer.vocab_size} ids but the "
                       f"model's token embedding has {arch['text']['vocab_size']} rows.")
  else:
    logging.warning("No --bpe_vocab: set --config.tokenizer.path=<bpe_simple_vocab_16e6.txt.gz> "
                    "when evaluating or fine-tuning %s.", workdir)
  ckpt = checkpoint.Checkpointer(workdir, every=1, keep=1, async_save=False)
  ckpt.save(0, {"step": np.zeros((), np.int32), "params": params}, config, force=True)
  ckpt.close()
  return config


def export_checkpoint(workdir: str, output: str, *, step: int | None = None,
                      dtype: str = "float32", ema: bool = False) -> dict[str, np.ndarray]:
  """Writes `workdir`'s parameters (ema=True: their moving average, config.ema_decay) as an
  OpenAI-layout safetensors file; returns what it wrote."""
  import ml_dtypes  # noqa: F401  (numpy's 'bfloat16')
  from safetensors.numpy import save_file

  from xclip_jax import checkpoint
  from xclip_jax.interop import openai_layout

  params = checkpoint.load_params(workdir, step, ema=ema)
  config = checkpoint.saved_config(workdir, step)
  state = {k: v.astype(dtype) for k, v in openai_layout.from_params(params).items()}
  extra = sorted(k for k in params if k not in ("image", "text", "logit_scale"))
  if extra:
    logging.warning("Not exported (no place in OpenAI's layout): %s.", extra)
  if config.model.activation != "quick_gelu":
    logging.warning("The model uses %s: load it as an open_clip model without `-quickgelu`.",
                    config.model.activation)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  save_file(state, output, metadata={"format": "pt", "source": "xclip_jax"})
  return state

def _define_flags() -> None:
  """The CLI's flags; defined only when run as a program, so that importing this module
  (tests, notebooks) claims no global flag names such as --config."""
  flags.DEFINE_string("input", None, "Checkpoint to import (.safetensors / .pt / .bin).")
  flags.DEFINE_string("workdir", None, "xclip_jax workdir (written by import, read by "
                      "--export).")
  flags.DEFINE_string("bpe_vocab", "", "OpenAI's merges file (bpe_simple_vocab_16e6.txt.gz, "
                      "in the open_clip_torch wheel): the imported model's tokenizer.")
  flags.DEFINE_enum("activation", "quick_gelu", ["quick_gelu", "gelu"],
                    "MLP activation the checkpoint was trained with.")
  flags.DEFINE_integer("vision_heads", 0, "Image tower heads (0: from the width).")
  flags.DEFINE_integer("text_heads", 0, "Text tower heads (0: width // 64).")
  flags.DEFINE_bool("export", False, "Export --workdir to --output instead of importing.")
  flags.DEFINE_string("output", None, "Exported .safetensors file.")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_bool("ema", False, "Export the parameters' moving average (runs trained with "
                    "--config.ema_decay).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"],
                    "Exported weights' dtype (OpenAI released float16).")
  config_flags.DEFINE_config_file(
      "config", None, "Optional config file for everything but the model (data, evals, optim).",
      lock_config=False)


def main(argv):
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not f.workdir:
    raise app.UsageError("--workdir is required.")
  if f.export:
    if not f.output:
      raise app.UsageError("--export needs --output=FILE.safetensors.")
    state = export_checkpoint(f.workdir, f.output, step=f.step, dtype=f.dtype, ema=f.ema)
    print(f"Wrote {f.output}: {len(state)} tensors, "
          f"{sum(v.size for v in state.values()) / 1e6:.2f}M parameters ({f.dtype}).")
    return
  if not f.input:
    raise app.UsageError("--input=CHECKPOINT is required (or --export).")
  config = import_checkpoint(f.input, f.workdir, bpe_vocab=f.bpe_vocab,
                             activation=f.activation, vision_heads=f.vision_heads,
                             text_heads=f.text_heads, base_config=f.config)
  m = config.model
  print(f"Wrote {f.workdir}: ViT {m.image.image_size}px/{m.image.patch_size} width "
        f"{m.image.width} x {m.image.layers} layers ({m.image.heads} heads); text width "
        f"{m.text.width} x {m.text.layers} ({m.text.heads} heads), context "
        f"{m.text.context_length}, vocab {m.text.vocab_size}; embed {m.embed_dim}; "
        f"{m.activation}.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
