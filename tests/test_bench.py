"""The benchmark: analytic FLOPs by hand, a tiny run, and no TensorFlow needed."""

import os
import subprocess
import sys

import pytest

from xclip_jax import bench

import configs.clip as clip_config
import configs.declip as declip_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(module):
  c = module.get_config("demo")
  c.batch_size = 8
  c.model.embed_dim = 16
  c.model.image.update(dict(image_size=16, patch_size=8, width=32, layers=2, heads=2))
  c.model.text.update(dict(context_length=8, width=16, layers=1, heads=2, vocab_size=64))
  if module is declip_config:
    c.declip.update(dict(queue_size=64, projector_hidden=16, projector_dim=16, predictor_hidden=8))
  return c


def test_analytic_flops_hand_computed():
  c = _tiny(clip_config)
  # Image: 4 patches + class = 5 tokens, W=32, 2 layers, r=4:
  #   per layer 2*5*12*32^2 + 4*25*32 = 122880 + 3200; patch embed 2*4*64*3*32; projection 2*32*16.
  image = 2 * (122880 + 3200) + 2 * 4 * 64 * 3 * 32 + 2 * 32 * 16
  # Text: 8 tokens, W=16, 1 layer: 2*8*12*256 + 4*64*16; projection 2*16*16.
  text = (2 * 8 * 12 * 256 + 4 * 64 * 16) + 2 * 16 * 16
  assert bench.analytic_flops(c, 1, 1) == 3 * 8 * (image + text)
  assert bench.analytic_flops(c, 2, 2) == 2 * bench.analytic_flops(c, 1, 1)


@pytest.mark.parametrize("module", [clip_config, declip_config])
def test_tiny_benchmark_reports_sane_figures(module):
  result = bench.run_benchmark(_tiny(module), steps=2)   # augment="both": two steps compiled
  assert result["step_time_median"] > 0 and result["images_per_sec"] > 0
  assert result["compile_seconds"] > 0
  assert 0 < result["mfu"] < 1.5
  assert result["flops_per_step_xla_scan_body_once"] > 0
  assert result["temp_bytes_per_device"] > 0
  assert result["devices"] == 8 and result["mesh"]["data"] == 8
  # Both steps were timed (with and without device augmentation) over the declared views.
  assert result["device_augment"] is True and result["step_time_median_no_augment"] > 0
  assert result["augment_overhead"] == pytest.approx(
      result["step_time_median"] / result["step_time_median_no_augment"] - 1)
  assert 0 < result["augment_only_time_median"] < result["step_time_median"]
  assert result["augment_only_share"] == pytest.approx(
      result["augment_only_time_median"] / result["step_time_median_no_augment"])
  views = {"image": "moco", "image2": "moco"} if module is declip_config else {"image": "clip"}
  assert result["image_views"] == views
  assert result["image_bytes_per_step"] == 8 * 16 * 16 * 3 * len(views)   # uint8: 1 byte/pixel


def test_benchmark_without_device_augmentation_times_one_step():
  result = bench.run_benchmark(_tiny(clip_config), steps=1, augment="off")
  assert result["device_augment"] is False and result["step_time_median"] > 0
  assert not {"step_time_median_no_augment", "augment_overhead", "augment_only_share"} & set(result)
  assert result["image_bytes_per_step"] == 8 * 16 * 16 * 3       # what the pipeline sends: uint8
  with pytest.raises(ValueError, match="augment='sometimes'"):
    bench.run_benchmark(_tiny(clip_config), steps=1, augment="sometimes")


def test_bench_runs_without_tensorflow(tmp_path):
  code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
          "sys.path.insert(0, '.')\n"
          "from xclip_jax import bench\n"
          "import configs.clip as c\n"
          "cfg = c.get_config('demo'); cfg.batch_size = 8; cfg.model.image.layers = 1\n"
          "cfg.model.text.layers = 1\n"
          "print('MFU', bench.run_benchmark(cfg, steps=1)['mfu'])\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "MFU" in out.stdout


def test_compile_only_reports_per_device_memory_and_fsdp_shrinks_it():
  replicated = _tiny(clip_config)
  sharded = _tiny(clip_config)
  sharded.mesh.update(dict(data=1, fsdp=8))
  a = bench.run_benchmark(replicated, steps=0)
  b = bench.run_benchmark(sharded, steps=0)
  assert "step_time_median" not in a                       # nothing was run
  assert b["param_bytes_per_device"] < 0.5 * a["param_bytes_per_device"]
  assert b["opt_state_bytes_per_device"] < 0.5 * a["opt_state_bytes_per_device"]
  assert a["temp_bytes_per_device"] > 0
