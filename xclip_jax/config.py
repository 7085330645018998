"""Shared config helpers: the field schema every method config starts from, variants, validation.

Every config file in configs/ builds on `base_config()` so that the train loop, the data pipeline
and the model read one schema. Fields that a method does not use still exist (with neutral values),
which lets `--config.key=value` overrides be type-checked for every method alike. The shared
sections are written here; each method's own section (config.declip, ...) comes from its file in
xclip_jax/methods/ through the registry.
"""

from __future__ import annotations

import math

import ml_collections

# Demo towers: a train step takes ~0.45 s at batch 128 on a 2-core CPU. 8px patches (17 tokens)
# cost a third of 4px patches (65 tokens) per step; the text only has to read colour/shape words.
# ImageNet's normalisation, which DeCLIP's and SLIP's recipes use instead of CLIP's.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DEMO_IMAGE = dict(image_size=32, patch_size=8, width=128, layers=4, heads=4, mlp_ratio=4.0)
DEMO_TEXT = dict(context_length=32, width=64, layers=4, heads=2, mlp_ratio=4.0, vocab_size=1024)


def parse_variant(arg: str | None, *, default: str, choices: tuple[str, ...]) -> str:
  """Returns the variant named after ':' in --config=file.py:VARIANT, checked against `choices`."""
  variant = (arg or default).strip()
  if variant not in choices:
    raise ValueError(f"Unknown config variant {variant!r}; choose one of {', '.join(choices)}.")
  return variant


def base_config() -> ml_collections.ConfigDict:
  """The full schema with CLIP ViT-B/32 defaults. Methods and variants change values, not keys."""
  c = ml_collections.ConfigDict()
  c.method = "clip"
  c.variant = ""
  c.seed = 0
  c.total_steps = 10_000
  c.batch_size = 4096          # global batch, split over the mesh's batch axes (data x fsdp)
  c.log_every = 50
  c.eval_every = 1000          # steps between in-loop evaluations (0: only at the end)
  # Micro-batches per step (gradient accumulation keeping the global batch as negatives; CLIP).
  c.accum_steps = 1
  c.dry_run = False            # build everything and compile the step, then stop
  # A workdir (or <workdir>/checkpoints/<step>) whose model parameters start a fresh run (step 0,
  # new optimizer state): fine-tuning, e.g. of a model imported by xclip_jax.interop.convert.
  c.init_from = ""
  # > 0: the state also keeps a moving average of the parameters (e.g. 0.9999), checkpointed and
  # evaluated beside them (ema/* results); xclip_jax.load(workdir, ema=True) loads it. ema.py.
  c.ema_decay = 0.0

  # ---- model ------------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 512                  # joint image-text embedding width
  c.model.dtype = "float32"                # compute dtype: float32 | bfloat16 (params stay float32)
  c.model.remat = "none"                   # none | full | dots (jax.checkpoint policy per block)
  c.model.activation = "quick_gelu"        # CLIP's QuickGELU; "gelu" for exact GELU
  c.model.logit_scale_init = math.log(1 / 0.07)
  # The forward pass multiplies by min(exp(logit_scale), logit_scale_max), with the gradient of
  # that value kept at the cap (DeCLIP's `.data` clamp), so the parameter can come back down.
  c.model.logit_scale_max = 100.0
  # (lo, hi): the method clamps the *parameter* here after each update; () = (0, ln max), CLIP's.
  c.model.logit_scale_range = ()
  c.model.image = ml_collections.ConfigDict(
      dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0,
           freeze_patch_embed=False))      # True: no updates to the patch embedding (DeCLIP)
  c.model.text = ml_collections.ConfigDict(
      dict(context_length=77, width=512, layers=12, heads=8, mlp_ratio=4.0, vocab_size=32_000,
           causal=True))
  # FLIP (Li et al. 2023): the fraction of patch tokens each training image drops at random (never
  # the class token; evaluation keeps all), so the image tower runs on fewer tokens. models/vit.py.
  c.model.image.patch_dropout = 0.0

  # ---- contrastive loss implementation ----------------------------------------------------------
  # global: clip_loss over global arrays (XLA partitions it); chunked: explicit shard_map with
  # all-gathered embeddings and column-chunked logits (O(B/n x chunk) memory; same gradients).
  c.contrastive = ml_collections.ConfigDict(dict(impl="global", chunk=4096))

  # ---- optimiser: AdamW with CLIP's betas, linear warmup + cosine decay -------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4
  c.optim.min_lr = 0.0
  c.optim.warmup_steps = 2000
  # After the linear warmup: cosine (to min_lr at total_steps) | constant | constant_cooldown |
  # rsqrt (big_vision's lr / sqrt(1 + (t - warmup_steps) / rsqrt_timescale)). constant_cooldown
  # and rsqrt end with a linear cooldown to min_lr over the last cooldown_steps steps (or
  # cooldown_fraction of total_steps; rsqrt's is optional). Formulas: optim.py.
  c.optim.schedule = "cosine"
  c.optim.cooldown_steps = 0
  c.optim.cooldown_fraction = 0.0
  c.optim.rsqrt_timescale = 10_000
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.2
  # adamw: each step decays by lr(t) x weight_decay; big_vision: by weight_decay x lr(t) / lr
  # (decay not multiplied by the learning rate, SigLIP's trainer). See optim.py.
  c.optim.decay_convention = "adamw"
  # Global-norm clipping; 0 disables. CLIP's, SLIP's and DeCLIP's recipes clip nothing (nor
  # does open_clip by default); SigLIP's (big_vision) clips at 1.
  c.optim.grad_clip_norm = 0.0
  # A step with a non-finite loss or gradient is skipped; this many in a row stop the run (0: never).
  c.optim.max_nonfinite_steps = 10
  # Parameters whose path contains one of these names get no weight decay (biases, norms, scalars).
  c.optim.no_decay = ("bias", "scale", "logit_scale", "class_embedding")
  # Fine-tuning controls (param_groups.py). The tower whose parameters do not train, projection
  # included: '' (none), 'image' (LiT) or 'text'. (Not `lock`: that is a ConfigDict method.)
  c.optim.locked_tower = ""
  # Learning-rate multipliers: ((regex fullmatching the '/'-joined parameter path, mult), ...);
  # the first match wins, 0 freezes. Command line: --config.optim.lr_mults='image/.*=0.1',
  # repeated for more.
  c.optim.lr_mults = ()
  # The image tower's layer-wise lr decay d (BEiT): block i of L x d^(L - i), embeddings
  # x d^(L + 1), ln_post and projection x 1. 1 turns it off.
  c.optim.layer_decay = 1.0

  # ---- mesh: axes (data, fsdp, tensor); -1 fills with the remaining devices ---------------------
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # ---- data: any TFDS image-text dataset ---------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = "xclip_demo"               # TFDS name (optionally name:version)
  c.data.data_dir = ""                     # "" -> TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.split = "train"
  # Several datasets, weighted: 'NAME:WEIGHT,NAME:WEIGHT|text_key=caption|split=train...' (each
  # source's own split/image_key/text_key/data_dir after '|'; data/mixture.py). data.name still
  # names the tokenizer's and the evaluators' default dataset.
  c.data.mixture = ""
  c.data.image_key = "image"
  c.data.text_key = "captions/text"        # '/' walks nested features; lists get one random caption
  c.data.shuffle_buffer = 10_000
  c.data.crop_scale = (0.9, 1.0)           # RandomResizedCrop area range
  c.data.flip = True
  # Two-view methods (DeCLIP) augment each view with MoCo v2's recipe on top of crop and flip:
  c.data.view_crop_scale = (0.2, 1.0)      # RandomResizedCrop area range of each view
  c.data.color_jitter = (0.4, 0.4, 0.4, 0.1)   # brightness, contrast, saturation, hue
  c.data.color_jitter_prob = 0.8
  c.data.grayscale_prob = 0.2
  c.data.blur_prob = 0.5
  c.data.blur_sigma = (0.1, 2.0)           # Gaussian blur sigma range, in pixels at the view size
  c.data.mean = (0.48145466, 0.4578275, 0.40821073)   # CLIP's normalisation
  c.data.std = (0.26862954, 0.26130258, 0.27577711)
  c.data.prefetch = 2                      # global batches kept in flight on the devices
  c.data.num_parallel_calls = -1           # -1: tf.data AUTOTUNE
  # Resume replays the exact data order of an uninterrupted run (skipping the records already
  # seen, undecoded); False reseeds instead, which starts instantly on very long runs.
  c.data.exact_resume = True
  c.data.builtin = True                    # the name is an embedded builder prepared on first use
  # Bad records (undecodable image, empty caption, too many pixels) are dropped and counted
  # (data/* metrics). Each step decodes batch + spare_records records so that dropped ones are
  # replaced without repeating rows; 0 refills a dropped row's slot from the same batch.
  c.data.spare_records = 0
  c.data.max_image_pixels = 89_478_485     # skip larger JPEG/PNG before decoding (0 = no limit)
  # A train crop is resized with antialiasing where it shrinks by more than this factor (below
  # it, plain bilinear: what PIL/torchvision compute when enlarging, ~4x cheaper on the host).
  # 1.0 antialiases every reduction, as torchvision does (data/view_crops.py).
  c.data.antialias_above = 2.0

  # ---- tokenizer (SentencePiece, or OpenAI's BPE for imported models) ---------------------------
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "sentencepiece"       # sentencepiece | clip_bpe (path = OpenAI's merges file)
  c.tokenizer.path = ""                    # "" -> <data_dir>/<dataset>/spm_<vocab>.model
  c.tokenizer.train_if_missing = False     # the demo trains it on first use from the captions

  # ---- evaluation in the loop -------------------------------------------------------------------
  c.evals = ml_collections.ConfigDict()
  # The image transform of every evaluator and of xclip_jax.load(...).preprocess:
  # resize_256_crop_224 (shorter side to 256/224 of the model size, centre crop) | openai
  # (OpenAI's: bicubic to the model size, centre crop; what imported models use).
  c.evals.transform = "resize_256_crop_224"
  # split / templates "auto": a curated benchmark's (evaluate/zeroshot_data), else "test" /
  # OpenAI's 80 ImageNet templates; class_names=() takes the curated or the TFDS names.
  c.evals.zeroshot = ml_collections.ConfigDict(dict(
      type="zeroshot", dataset="", data_dir="", split="auto", image_key="image", label_key="label",
      templates="auto", batch_size=256, max_examples=0, class_names=()))
  c.evals.zeroshot.enabled = False
  # Image <-> text recall over a split with several captions per image (e.g. coco_captions).
  c.evals.retrieval = ml_collections.ConfigDict(dict(
      type="retrieval", enabled=False, dataset="", data_dir="", split="test", image_key="image",
      text_key="captions/text", batch_size=256, max_examples=0))
  # Logistic regression on frozen image features; validation = last val_percent% of train.
  c.evals.linear_probe = ml_collections.ConfigDict(dict(
      type="linear_probe", enabled=False, dataset="", data_dir="", train_split="train",
      val_split="", val_percent=10, test_split="test", image_key="image", label_key="label",
      batch_size=256, max_examples=0, steps=300))

  # ---- each method's own section (config.declip, config.nclip, ...): xclip_jax/methods/ -----
  # Every section is in every config, so overrides of any method's fields are type-checked.
  from xclip_jax import methods  # noqa: PLC0415  (local: `import xclip_jax.config` stays light)
  for name, section in methods.config_sections().items():
    c[name] = section

  # ---- checkpoints ------------------------------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))

  # ---- tracking: TensorBoard events and metrics.jsonl always; Weights & Biases optionally -------
  # (pip install 'xclip_jax[wandb]'). "" = W&B's defaults (project, run name); dir "" = $WANDB_DIR,
  # else the workdir. mode: online | offline (upload later with `wandb sync`). tracking.py.
  c.wandb = ml_collections.ConfigDict(dict(enabled=False, project="", name="", mode="online",
                                           dir=""))

  # ---- profiling: a jax.profiler trace of steps start_step .. start_step + num_steps - 1 into
  # <workdir>/profile (TensorBoard's profile plugin); num_steps=0: off. perfetto: also write
  # perfetto_trace.json.gz (ui.perfetto.dev). profiling.py.
  c.profile = ml_collections.ConfigDict(dict(start_step=10, num_steps=0, perfetto=False))
  return c


def apply_demo(c: ml_collections.ConfigDict) -> None:
  """Tiny towers on the embedded demo dataset: minutes on a laptop CPU."""
  c.total_steps = 600
  c.batch_size = 128
  c.log_every = 25
  c.eval_every = 200
  c.model.embed_dim = 128
  c.model.image.update(DEMO_IMAGE)
  c.model.text.update(DEMO_TEXT)
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.1
  c.data.name = "xclip_demo"
  c.data.builtin = True
  c.data.shuffle_buffer = 4096
  c.data.crop_scale = (0.8, 1.0)
  c.data.flip = False              # captions say "left"/"right": a flip would make them wrong
  c.data.antialias_above = 1.0     # 64 -> 32 px crops shrink ~1.8x; antialiasing costs nothing here
  c.tokenizer.train_if_missing = True
  c.evals.zeroshot.enabled = True
  c.evals.zeroshot.dataset = "xclip_demo"
  c.evals.zeroshot.split = "test"
  c.evals.zeroshot.templates = "demo"
  c.evals.retrieval.enabled = True
  c.evals.retrieval.dataset = "xclip_demo"
  c.evals.linear_probe.dataset = "xclip_demo"     # off by default: --config.evals.linear_probe.enabled
  c.evals.linear_probe.max_examples = 5000
  c.checkpoint.every = 200
  c.checkpoint.keep = 2


def apply_paper_clip(c: ml_collections.ConfigDict, *, patch_size: int) -> None:
  """CLIP's published ViT recipe shape; the dataset must be prepared by the user."""
  c.model.image.update(dict(image_size=224, patch_size=patch_size, width=768, layers=12, heads=12))
  c.model.text.update(dict(context_length=77, width=512, layers=12, heads=8))
  c.model.dtype = "bfloat16"
  c.total_steps = 100_000
  c.batch_size = 32_768
  c.data.name = "laion400m"        # a placeholder name users replace; see README 'Your own data'
  c.data.builtin = False
  c.data.text_key = "caption"
  c.data.crop_scale = (0.9, 1.0)
  c.evals.zeroshot.enabled = False


def _check_wandb(w: ml_collections.ConfigDict) -> None:
  """config.wandb: a known mode, and the wandb package installed when enabled. (Here, not in
  tracking.py: validation must not import clu's writers, which load TensorFlow.)"""
  if w.mode not in ("online", "offline"):
    raise ValueError(f"config.wandb.mode={w.mode!r}: use online or offline.")
  if w.enabled:
    from xclip_jax import wandb_writer  # noqa: PLC0415
    wandb_writer.import_wandb()   # raises ImportError saying what to install


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks that fail fast, before any compilation, with a message saying what to change."""
  from xclip_jax import methods  # local: keeps config import light
  from xclip_jax import ema, optim, param_groups, profiling
  from xclip_jax.models import vit

  if c.method not in methods.names():
    raise ValueError(f"config.method={c.method!r} is not one of {list(methods.names())}.")
  for tower in ("image", "text"):
    t = c.model[tower]
    if t.width % t.heads:
      raise ValueError(f"config.model.{tower}.width={t.width} is not divisible by heads={t.heads}.")
  if c.model.image.image_size % c.model.image.patch_size:
    raise ValueError("config.model.image.image_size must be a multiple of patch_size.")
  if c.accum_steps < 1 or c.batch_size % c.accum_steps:
    raise ValueError(f"config.accum_steps={c.accum_steps} must be >= 1 and divide "
                     f"config.batch_size={c.batch_size}.")
  if c.contrastive.impl not in ("global", "chunked"):
    raise ValueError(f"config.contrastive.impl={c.contrastive.impl!r}: use global or chunked.")
  methods.check_config(c)
  methods.check_options(c)
  if c.contrastive.impl == "chunked" and c.batch_size % min(c.contrastive.chunk, c.batch_size):
    raise ValueError(f"config.contrastive.chunk={c.contrastive.chunk} must divide "
                     f"config.batch_size={c.batch_size}.")
  if c.optim.decay_convention not in ("adamw", "big_vision"):
    raise ValueError(f"config.optim.decay_convention={c.optim.decay_convention!r}: use adamw or "
                     "big_vision.")
  if c.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype={c.model.dtype!r}: use float32 or bfloat16.")
  if c.model.remat not in ("none", "full", "dots"):
    raise ValueError(f"config.model.remat={c.model.remat!r}: use none, full or dots.")
  if c.total_steps <= 0 or c.batch_size <= 0:
    raise ValueError("config.total_steps and config.batch_size must be positive.")
  if c.optim.warmup_steps >= c.total_steps:
    raise ValueError(f"config.optim.warmup_steps={c.optim.warmup_steps} must be below "
                     f"config.total_steps={c.total_steps}.")
  optim.check_schedule(c.optim, c.total_steps)
  param_groups.check_config(c)
  ema.check(c)
  vit.num_kept_patches((c.model.image.image_size // c.model.image.patch_size)**2,
                       c.model.image.patch_dropout)
  _check_wandb(c.wandb)
  profiling.check_config(c)


def merge_saved(schema: ml_collections.ConfigDict, saved: dict) -> None:
  """Writes a saved config (JSON: lists for tuples) into `schema`, keeping fields it lacks.

  Keys the schema does not know are kept too (a config from a newer version still loads).
  """
  for key, value in saved.items():
    if isinstance(value, dict) and key in schema and isinstance(schema[key],
                                                                  ml_collections.ConfigDict):
      merge_saved(schema[key], value)
    elif key in schema:
      current = schema[key]
      if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
      with schema.unlocked():
        schema[key] = value
    else:
      with schema.unlocked():
        schema[key] = value
