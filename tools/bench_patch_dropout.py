"""FLIP patch dropout's step speed-up measured in one process: one train state stepped in turn by
the train step compiled at each rate (rate A, rate B, ..., then again), so that a machine shared
with other work slows every rate alike and the ratios hold even when the absolute times do not.
Synthetic data (no TensorFlow), one image view (CLIP, SigLIP, nCLIP, xCLIP).

Not library code: `python -m xclip_jax.bench` times one rate per process; this script gives the
ratio between rates.

  python tools/bench_patch_dropout.py --config=configs/clip.py:vit_b16 --rates=0,0.5,0.75 \
      --steps=5 --config.batch_size=8 --config.model.dtype=float32 [--json=out.json]

--config, --steps and --json are xclip_jax.bench's flags; --steps counts timed steps per rate.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xclip_jax import bench  # noqa: E402

_RATES = flags.DEFINE_list("rates", ["0", "0.5", "0.75"], "Patch-dropout rates to compare.")


def run(config, rates: list[float], steps: int) -> dict:
  import jax
  from xclip_jax import optim
  from xclip_jax import config as config_lib
  from xclip_jax import train_state as ts
  from xclip_jax import methods
  from xclip_jax.data import synthetic
  from xclip_jax.data import text_spec as text_spec_lib
  from xclip_jax.parallel import mesh as mesh_lib

  method = methods.get_method(config.method)
  if len(method.views.image) != 1:
    raise ValueError(f"{config.method} encodes {len(method.views.image)} image views; this "
                     "script times single-view methods.")
  configs = {}
  for rate in rates:
    configs[rate] = copy.deepcopy(config)
    configs[rate].model.image.patch_dropout = rate
    config_lib.validate(configs[rate])
  mesh = mesh_lib.make_mesh(config.mesh)
  model_fn = lambda c: (lambda: methods.build_model(c, eos_id=2, seed=c.seed))
  # The rate changes no parameter, only the module's static structure: one state for every
  # rate's step, and each rate's graphdef from an abstract (uncomputed) model.
  _, params, model_state = mesh_lib.create_sharded(model_fn(configs[rates[0]]), mesh)
  tx, schedule = optim.make_optimizer(config, params)
  state = ts.init_train_state(params, model_state, tx, mesh, config.seed,
                              ts.init_method_state(method, config, mesh, config.seed))
  text_spec = text_spec_lib.TextSpec.reserved(config.model.text.vocab_size)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  batch = jax.device_put(synthetic.global_batch(config, 0), batch_sharding)
  compiled, result = {}, {"config": f"{config.method}:{config.variant}",
                          "batch_size": config.batch_size, "dtype": config.model.dtype,
                          "devices": jax.device_count(),
                          "device_kind": jax.devices()[0].device_kind, "rates": {}}
  for rate, c in configs.items():
    graphdef, _, _ = mesh_lib.abstract_model(model_fn(c), mesh)
    step = ts.jit_train_step(ts.make_train_step(graphdef, tx, schedule, method, c, text_spec),
                             ts.shardings_of(state), batch_sharding, mesh)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled[rate] = step.lower(state, batch).compile()
    result["rates"][str(rate)] = {"compile_seconds": round(time.perf_counter() - t0, 2),
                                  "flops_per_step_model": bench.analytic_flops(c, 1, 1)}

  times = {rate: [] for rate in rates}
  for i in range(steps + 1):                   # pass 0 is the warm-up
    for rate in rates:
      t0 = time.perf_counter()
      state, metrics = compiled[rate](state, batch)
      jax.block_until_ready(metrics)
      if i:
        times[rate].append(time.perf_counter() - t0)
  base = rates[0]
  for rate in rates:
    entry = result["rates"][str(rate)]
    entry.update(step_time_median=statistics.median(times[rate]), step_times=times[rate],
                 images_per_sec=config.batch_size / statistics.median(times[rate]))
    entry["speedup_vs_first_rate"] = (statistics.median(times[base]) /
                                      statistics.median(times[rate]))
    entry["flops_ratio_vs_first_rate"] = (result["rates"][str(base)]["flops_per_step_model"] /
                                          entry["flops_per_step_model"])
  return result


def main(argv):
  del argv
  f = flags.FLAGS
  result = run(f.config, [float(r) for r in _RATES.value], f.steps)
  text = json.dumps(result, indent=2)
  print(text)
  if f.json:
    with open(f.json, "w") as out:
      out.write(text + "\n")


if __name__ == "__main__":
  bench._define_flags()  # noqa: SLF001  (the benchmark's own --config, --steps, --json, --augment)
  flags.mark_flags_as_required(["config"])
  app.run(main)
