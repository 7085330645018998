"""Train-step benchmark on synthetic in-memory data (no TensorFlow): compile time, step time,
images/s, FLOPs (XLA's cost analysis and an analytic count), achieved TFLOP/s, MFU, memory.

  python -m xclip_jax.bench --config=configs/clip.py:vit_b16 [--steps=20] [--json=out.json]
      [--augment=both|on|off] [--config.batch_size=256 ...]

The batch holds the views the method declares, as uint8 pixels like the real input pipeline's;
the step augments and normalises them on the device (data/device_augment.py). --augment=both
(the default) also times the same step without that work, fed already-normalised float32
images, and the augmentation alone, alternating step by step so that a busy machine slows each
alike: step_time_median_no_augment, augment_overhead (with / without - 1) and
augment_only_share (augmentation alone / step without) report it.

MFU is model FLOPs per step / step time / the devices' peak. Model FLOPs are the analytic count of
the towers' matmuls and attention (3 x forward, as PaLM's MFU defines it): XLA's cost analysis
counts the body of a `while` loop once, and the blocks are scanned, so its figure is reported
beside it (about total / layers) but not used. The peak comes from a
table of dense bf16/fp32 figures for known accelerators; on CPU it is a float32 matmul timed on the
spot, so the CPU figure says how close the step gets to this machine's own matmul speed.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags, logging
from ml_collections import config_flags


def _define_flags() -> None:
  """The CLI's flags, defined only when this module runs as a program: importing it (tests,
  notebooks) next to another entry point that defines --config must not collide."""
  config_flags.DEFINE_config_file("config", None, "Config file[:variant].", lock_config=True)
  flags.DEFINE_integer("steps", 10, "Timed steps after one warm-up step; 0: compile only.")
  flags.DEFINE_string("json", "", "Also write the results here.")
  flags.DEFINE_enum("augment", "both", ["both", "on", "off"],
                    "Device-side augmentation in the timed step: on, off, or both "
                    "(time each, alternating, and report the overhead).")

# Peak dense TFLOP/s per device (vendor figures, without sparsity).
PEAK_TFLOPS = {
    ("gpu", "H100"): {"bfloat16": 989.0, "float32": 67.0},     # SXM; TF32 tensor cores: 494
    ("gpu", "H200"): {"bfloat16": 989.0, "float32": 67.0},
    ("gpu", "A100"): {"bfloat16": 312.0, "float32": 19.5},
    ("tpu", "v4"): {"bfloat16": 275.0, "float32": 275.0},
    ("tpu", "v5e"): {"bfloat16": 197.0, "float32": 197.0},
    ("tpu", "v5p"): {"bfloat16": 459.0, "float32": 459.0},
}


def device_peak_tflops(dtype: str) -> tuple[float, str]:
  """(peak TFLOP/s of one device, where the figure comes from)."""
  import jax
  import jax.numpy as jnp
  device = jax.devices()[0]
  kind = device.device_kind
  for (platform, name), peaks in PEAK_TFLOPS.items():
    if device.platform == platform and name.lower() in kind.lower().replace(" ", ""):
      return peaks[dtype], f"table: {kind}"
  # Measured: a float32 matmul on this device.
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / min(times) / 1e12, f"timed {n}x{n} float32 matmul on {kind}"


def _tower_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
  """Forward FLOPs of one sequence through pre-LN blocks: weights 2 * (4 + 2r) W^2 per token,
  attention scores and values 2 * 2 * S^2 * W per layer."""
  per_layer = 2 * tokens * (4 + 2 * mlp_ratio) * width**2 + 4 * tokens**2 * width
  return layers * per_layer


def analytic_flops(config, image_views: int, text_views: int) -> float:
  """Training FLOPs per step of the two towers (3 x forward), heads and loss ignored. With patch
  dropout the blocks count the kept tokens; the patch embedding runs on every patch."""
  from xclip_jax.models import vit
  im, tx = config.model.image, config.model.text
  patches = (im.image_size // im.patch_size) ** 2
  kept = vit.num_kept_patches(patches, im.get("patch_dropout", 0.0))
  image = _tower_flops(kept + 1, im.width, im.layers, im.mlp_ratio)
  image += 2 * patches * im.patch_size**2 * 3 * im.width + 2 * im.width * config.model.embed_dim
  text = _tower_flops(tx.context_length, tx.width, tx.layers, tx.mlp_ratio)
  text += 2 * tx.width * config.model.embed_dim
  return 3 * config.batch_size * (image_views * image + text_views * text)


def _interleaved_times(steps: int, runners: dict) -> dict[str, list[float]]:
  """Seconds of `steps` calls of each runner (returning arrays to wait for), interleaved:
  call 1 of each, then call 2 of each, ..."""
  import jax
  times = {name: [] for name in runners}
  for _ in range(steps):
    for name, run in runners.items():
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      times[name].append(time.perf_counter() - t0)
  return times


def run_benchmark(config, steps: int, augment: str = "both") -> dict:
  """augment: "on" (the train step as trained: uint8 in, augmented on the device), "off" (no
  device augmentation, normalised float32 in) or "both" (time both; figures of "on" plus the
  step time without augmentation and the overhead). steps=0 compiles one step: "off" or "on"."""
  import jax
  import numpy as np
  from xclip_jax import assembly
  from xclip_jax.data import device_augment, synthetic

  if augment not in ("both", "on", "off"):
    raise ValueError(f"augment={augment!r}: use both, on or off.")
  parts = assembly.build(config)        # synthetic data: SentencePiece's id layout
  method, mesh, state = parts.method, parts.mesh, parts.state
  batch_sharding = parts.batch_sharding
  host_batch = synthetic.global_batch(config, 0, method.views)
  image_keys = [view.key for view in method.views.image]
  if augment == "both" and steps > 0:
    variants = {"on": True, "off": False}
  else:                                   # compile-only reports the step as trained
    variants = {"off": False} if augment == "off" else {"on": True}
  batches, compiled, compile_seconds = {}, {}, {}
  for name, on in variants.items():
    if on:
      batch = host_batch                                   # uint8 pixels, as the pipeline's
    else:                                                  # what the host used to send
      batch = dict(host_batch, **{k: np.asarray(device_augment.normalize(
          host_batch[k], config.data.mean, config.data.std)) for k in image_keys})
    batches[name] = jax.device_put(batch, batch_sharding)
    step = parts.train_step(augment=on)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled[name] = step.lower(state, batches[name]).compile()
    compile_seconds[name] = time.perf_counter() - t0
  main = "off" if augment == "off" else "on"

  cost = compiled[main].cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0)) * jax.device_count()   # per-device program
  memory = compiled[main].memory_analysis()
  per_device = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree)
                                for s in x.addressable_shards[:1])
  result = {
      "config": f"{config.method}:{config.variant}", "batch_size": config.batch_size,
      "dtype": config.model.dtype, "remat": config.model.remat, "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape),
      "device_augment": main == "on",
      "image_views": {view.key: view.augment for view in method.views.image},
      "image_bytes_per_step": sum(host_batch[k].nbytes for k in image_keys),
      "compile_seconds": round(compile_seconds[main], 2),
      "param_bytes_per_device": per_device(state["params"]),
      "opt_state_bytes_per_device": per_device(state["opt_state"]),
  }
  if "off" in compile_seconds and main == "on":
    result["compile_seconds_no_augment"] = round(compile_seconds["off"], 2)
  if memory is not None:
    result.update(
        argument_bytes_per_device=memory.argument_size_in_bytes,
        temp_bytes_per_device=memory.temp_size_in_bytes,      # activations and workspace
        output_bytes_per_device=memory.output_size_in_bytes)
  if steps <= 0:
    return result

  holder = {"state": state}

  def runner(name):
    def run():
      holder["state"], metrics = compiled[name](holder["state"], batches[name])
      holder[name] = metrics
      return metrics
    return run

  runners = {name: runner(name) for name in compiled}
  if len(compiled) == 2:
    # The augmentation alone, as the step runs it: a short program, so its time is less at the
    # mercy of a busy machine than the difference of two long steps.
    augment_only = jax.jit(
        device_augment.make_batch_augment(method.views, config.data, int(config.seed)),
        in_shardings=(batch_sharding, None), out_shardings=batch_sharding)
    with jax.set_mesh(mesh):
      augment_only = augment_only.lower(batches["on"], state["step"]).compile()
    runners["augment_only"] = lambda: augment_only(batches["on"], holder["state"]["step"])
  _interleaved_times(1, runners)                                         # warm-up
  times = _interleaved_times(steps, runners)
  step_time = statistics.median(times[main])
  peak, peak_source = device_peak_tflops(config.model.dtype)
  model_flops = analytic_flops(config, len(method.views.image), len(method.views.text))
  achieved = model_flops / step_time / 1e12
  result.update({
      "step_time_median": step_time,
      "step_time_min": min(times[main]), "images_per_sec": config.batch_size / step_time,
      "flops_per_step_model": model_flops,
      "flops_per_step_xla_scan_body_once": xla_flops,
      "achieved_tflops": achieved, "peak_tflops_per_device": peak, "peak_source": peak_source,
      "mfu": achieved / (peak * jax.device_count()),
      "loss": float(holder[main]["loss"]),
  })
  if "off" in times and main == "on":
    without = statistics.median(times["off"])
    alone = statistics.median(times["augment_only"])
    result.update({"step_time_median_no_augment": without,
                   "step_time_min_no_augment": min(times["off"]),
                   "augment_overhead": step_time / without - 1.0,
                   "augment_only_time_median": alone,
                   "augment_only_share": alone / without})
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    result["peak_bytes_in_use"] = stats["peak_bytes_in_use"]
  return result


def main(argv):
  del argv
  f = flags.FLAGS
  result = run_benchmark(f.config, f.steps, f.augment)
  text = json.dumps(result, indent=2)
  print(text)
  if f.json:
    os.makedirs(os.path.dirname(os.path.abspath(f.json)), exist_ok=True)
    with open(f.json, "w") as out:
      out.write(text + "\n")
  if "mfu" in result:
    logging.info("%s: %.3f s/step, %.1f img/s, MFU %.1f%%", result["config"],
                 result["step_time_median"], result["images_per_sec"], 100 * result["mfu"])
  if "augment_overhead" in result:
    logging.info("Device augmentation: %.3f s/step with, %.3f s/step without (%+.1f%%); "
                 "alone %.3f s (%.1f%% of the step without).",
                 result["step_time_median"], result["step_time_median_no_augment"],
                 100 * result["augment_overhead"], result["augment_only_time_median"],
                 100 * result["augment_only_share"])


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
