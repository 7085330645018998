"""Fine-tune a checkpoint: the config saved in WORKDIR (its model, tokenizer, data and evals), with
config.init_from = WORKDIR, so a new run starts from its parameters at step 0.

  python -m xclip_jax.main --config=configs/finetune.py:WORKDIR [--workdir=NEW_RUN] \
      [--config.data.name=... --config.optim.lr=1e-5 --config.total_steps=...]

WORKDIR is any run, or a model imported by `python -m xclip_jax.interop.convert`. Everything but
the model's shape can be overridden. The run trains in NEW_RUN (default:
workdirs/finetune_<WORKDIR's name>); WORKDIR itself is only read, and --workdir=WORKDIR is refused.
"""

import ml_collections

from xclip_jax import checkpoint


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if not arg:
    raise ValueError("Name the workdir to start from: --config=configs/finetune.py:WORKDIR")
  config = checkpoint.saved_config(arg)
  config.init_from = arg
  return config
