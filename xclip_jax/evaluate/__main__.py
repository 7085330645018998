"""Evaluate a checkpoint: python -m xclip_jax.evaluate --workdir=DIR [--step=N] [--config.evals...]

The config is the one saved with the checkpoint, merged onto the current schema, so every
`config.evals.<name>` field can be overridden on the command line, e.g.
  --config.evals.zeroshot.dataset=imagenet2012      (curated names, templates, split: one flag;
                                                     see runner.apply_named_datasets)
  --config.evals.zeroshot.dataset=cifar10 --config.evals.zeroshot.templates=clip80
  --config.evals.retrieval.enabled=True --config.evals.retrieval.dataset=coco_captions
  --config.evals.transform=openai                   (OpenAI's preprocessing; imported models' own)
Results go to <workdir>/eval/step_<N>.json and to the workdir's TensorBoard events at step N.

  --suite=clip_benchmark [--data_dir=TFDS_DIR]
runs zero-shot on every dataset of the suite prepared in the data_dir instead (evaluate/suite.py;
the others are listed with their `tfds build` command): <workdir>/eval/step_<N>_<suite>.json,
TensorBoard scalars <suite>/<dataset>/<metric>, and a table on stdout.
The mesh is every local device on the data axis (evaluation needs no parameter sharding to fit
the models this project trains; override with --config.mesh.*).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Multi-process runtime, as in xclip_jax.main.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index.")
_SUITE = flags.DEFINE_string("suite", None, "Zero-shot benchmark suite to run instead of "
                             "config.evals: imagenet | clip_benchmark (evaluate/benchmarks.py).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir of the suite's datasets "
                                "(default: config.evals.zeroshot.data_dir, config.data.data_dir, "
                                "$TFDS_DATA_DIR, ~/tensorflow_datasets).")


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def config_from_workdir(workdir: str, step: int | None):
  """The checkpoint's config merged onto base_config() (new fields keep their defaults)."""
  from xclip_jax import checkpoint
  config = checkpoint.saved_config(workdir, step)
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  return config


def evaluate(config, workdir: str, step: int | None) -> tuple[int, dict[str, float]]:
  from xclip_jax.evaluate import runner

  step, tokenizer, mesh, graphdef, restored = runner.restore(config, workdir, step)
  evaluators = runner.build_evaluators(config, tokenizer, mesh, graphdef)
  if not evaluators:
    raise app.UsageError("No evaluator is enabled: set --config.evals.<name>.enabled=True.")
  return step, runner.run_evaluators(evaluators, restored)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flags.FLAGS["config"].value
  from xclip_jax.evaluate import runner
  for change in runner.apply_named_datasets(config, sys.argv):
    logging.info("%s: the dataset is named on the command line.", change)
  if _SUITE.value:
    from xclip_jax.evaluate import benchmarks, suite
    if _SUITE.value not in benchmarks.SUITES:
      raise app.UsageError(f"--suite={_SUITE.value}: known suites are "
                           f"{sorted(benchmarks.SUITES)}.")
    step, results = suite.evaluate_workdir(config, _WORKDIR.value, _STEP.value, _SUITE.value,
                                           _DATA_DIR.value)
    path = runner.write_results(_WORKDIR.value, step, results, suite.scalars(results),
                                _SUITE.value)
    print(f"step {step}: " + suite.format_table(results))
    logging.info("Wrote %s.", path)
    return
  step, results = evaluate(config, _WORKDIR.value, _STEP.value)
  path = runner.write_results(_WORKDIR.value, step, results)
  for key in sorted(results):
    logging.info("%s = %.4g", key, results[key])
  print(json.dumps({"step": step, **results}, indent=2, sort_keys=True))
  logging.info("Wrote %s.", path)


def run():
  workdir = _flag_value(sys.argv, "workdir")
  if not workdir:
    sys.exit("usage: python -m xclip_jax.evaluate --workdir=DIR [--step=N] [--config.evals...] "
             "[--suite=NAME [--data_dir=DIR]]")
  step = _flag_value(sys.argv, "step")
  # The runtime must start before Orbax reads the saved config (reading touches JAX), so the
  # multi-process flags are read here; absl parses (and validates) them again in app.run.
  from xclip_jax.parallel import multihost
  multihost.initialize(_flag_value(sys.argv, "coordinator_address") or "",
                       int(_flag_value(sys.argv, "num_processes") or 0),
                       int(_flag_value(sys.argv, "process_id") or -1),
                       _flag_value(sys.argv, "distributed") or "auto")
  config_flags.DEFINE_config_dict(
      "config", config_from_workdir(workdir, int(step) if step else None))
  app.run(main)


if __name__ == "__main__":
  run()
