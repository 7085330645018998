"""Configs: variants, schema, and the errors a user sees before anything compiles."""

import os
import subprocess
import sys

import pytest

from configs import clip as clip_config
from xclip_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, env=None, timeout=120):
  return subprocess.run([sys.executable, "-m", "xclip_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=env)


def test_paper_variants_have_clips_architecture():
  for variant, patch in (("vit_b32", 32), ("vit_b16", 16)):
    c = clip_config.get_config(variant)
    assert (c.model.image.image_size, c.model.image.patch_size) == (224, patch)
    assert (c.model.image.width, c.model.image.layers, c.model.image.heads) == (768, 12, 12)
    assert c.model.embed_dim == 512
    assert (c.model.text.layers, c.model.text.width, c.model.text.heads) == (12, 512, 8)
    assert c.model.text.context_length == 77
    config_lib.validate(c)


def test_demo_is_small_and_valid():
  c = clip_config.get_config("demo")
  config_lib.validate(c)
  assert c.model.image.width <= 256 and c.batch_size <= 256 and c.data.builtin


def test_unknown_variant_and_invalid_values_are_rejected():
  with pytest.raises(ValueError, match="Unknown config variant"):
    clip_config.get_config("vit_h99")
  c = clip_config.get_config("demo")
  c.model.image.heads = 3
  with pytest.raises(ValueError, match="divisible by heads"):
    config_lib.validate(c)
  c = clip_config.get_config("demo")
  c.optim.warmup_steps = c.total_steps
  with pytest.raises(ValueError, match="warmup_steps"):
    config_lib.validate(c)


@pytest.mark.parametrize("override,expect", [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.optim.lrr=1e-3", "lrr"),
    ("--config.batch_size=lots", "batch_size"),
])
def test_cli_rejects_unknown_keys_and_wrong_types(tmp_path, override, expect):
  out = _main("--config=configs/clip.py:demo", f"--workdir={tmp_path}", override)
  assert out.returncode != 0
  assert expect in out.stderr
  assert "compiled" not in out.stderr            # failed before any compilation
  assert not os.path.exists(tmp_path / "checkpoints")


def test_paper_config_without_data_fails_fast_with_instructions(tmp_path):
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  out = _main("--config=configs/clip.py:vit_b32", f"--workdir={tmp_path / 'run'}",
              f"--config.data.data_dir={tmp_path / 'tfds'}",
              "--config.batch_size=8", env=env)
  assert out.returncode != 0
  assert "laion400m" in out.stderr and "config.data.name" in out.stderr
  assert "compiled" not in out.stderr
