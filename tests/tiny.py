"""The tiny configurations the tests train and step (not a test module: imported by tests).

Tiny towers: a step is a few ms, compilation a few seconds. `tiny_config` is the train config
(the demo data where a test reads data); `tiny_state` assembles its state and jitted step through
the same code a run uses (xclip_jax.assembly). conftest.py offers `tiny_config` as a fixture bound
to the session's demo data.
"""

import os
import sys

from xclip_jax import assembly
from xclip_jax import checkpoint

import configs.clip as clip_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "batch_size": 16, "total_steps": 4, "log_every": 1, "eval_every": 0,
    "model.embed_dim": 16,
    "model.image.width": 32, "model.image.layers": 2, "model.image.heads": 2,
    "model.image.patch_size": 16,
    "model.text.width": 32, "model.text.layers": 2, "model.text.heads": 2,
    # Constant after warmup: runs of different lengths (a resume) compile the same program, which
    # the session's compilation cache (conftest.py) then loads instead of compiling again.
    "optim.warmup_steps": 1, "optim.schedule": "constant", "data.shuffle_buffer": 64,
    # The demo clips gradients (configs/clip.py); the tiny runs test the loop, not that recipe,
    # and keep the plain AdamW step their expected values were written for.
    "optim.grad_clip_norm": 0.0,
    "evals.zeroshot.max_examples": 64, "evals.zeroshot.batch_size": 32,
    "checkpoint.every": 2, "checkpoint.keep": 3,
}


def tiny_config(data_dir, **overrides):
  """CLIP's demo config with tiny towers, reading the demo data in `data_dir` ("" for none)."""
  c = clip_config.get_config("demo")
  for key, value in {**TINY, "data.data_dir": data_dir, "evals.zeroshot.data_dir": data_dir,
                     **overrides}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def tiny_state(mesh, config):
  """(train state, jitted train step) of `config` on `mesh`, as a run assembles them."""
  parts = assembly.build(config, mesh=mesh)
  return parts.state, parts.train_step()


def checkpoint_steps(workdir):
  return sorted(int(p) for p in os.listdir(checkpoint.checkpoint_dir(workdir)) if p.isdigit())


def subprocess_env(devices: int) -> dict:
  """The environment for a subprocess with `devices` fake CPU devices: this test run's XLA flags
  and compilation cache (conftest.py), TensorFlow quiet."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
              XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]))


def main_command(workdir, data_dir, total_steps):
  """`python -m xclip_jax.main` on the tiny config, no evaluation, no interval checkpoints."""
  flags = [f"--config.{k}={v}" for k, v in TINY.items()]
  return [sys.executable, "-m", "xclip_jax.main", "--config=configs/clip.py:demo",
          f"--workdir={workdir}", *flags, f"--config.total_steps={total_steps}",
          f"--config.data.data_dir={data_dir}", f"--config.evals.zeroshot.data_dir={data_dir}",
          "--config.evals.zeroshot.enabled=False", "--config.checkpoint.every=100000"]
