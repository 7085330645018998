"""A benchmark suite in one command: zero-shot top-1/top-5 on every dataset of the suite that is
prepared in the data_dir, each with its curated class names, templates and split
(benchmarks.py); the others are listed with the `tfds build` command that prepares them.

    python -m xclip_jax.evaluate --workdir=DIR --suite=clip_benchmark [--data_dir=TFDS_DIR]

Nothing is downloaded: a dataset that is not prepared is skipped, never built.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from absl import logging

from xclip_jax.evaluate import benchmarks


def build_command(dataset: str, data_dir: str) -> str:
  """The command that prepares `dataset` in `data_dir`."""
  command = f"tfds build {dataset} --data_dir={data_dir}"
  if dataset in benchmarks.MANUAL_DOWNLOAD:
    command += f" --manual_dir=DIR  # DIR holds {benchmarks.MANUAL_DOWNLOAD[dataset]}"
  return command


def suite_eval_config(config, dataset: str, data_dir: str) -> ml_collections.ConfigDict:
  """config.evals.zeroshot (batch size, max_examples) pointed at one dataset of a suite, with
  the curated names, templates and split."""
  eval_cfg = ml_collections.ConfigDict(config.evals.zeroshot.to_dict())
  eval_cfg.update(dict(dataset=dataset, data_dir=data_dir, split="auto", templates="auto",
                       class_names=(), image_key="image", label_key="label", enabled=True))
  return eval_cfg


def run_suite(suite: str, config, tokenizer, mesh, graphdef, state: dict[str, Any],
              data_dir: str | None = None) -> dict[str, Any]:
  """{"suite", "data_dir", "transform", "datasets": {name: metrics}, "not_prepared":
  {name: command}, "mean_top1"} for the model in `state` ({"params", "model_state"})."""
  from xclip_jax.data import datasets, eval_datasets  # noqa: PLC0415  (TensorFlow: data)
  from xclip_jax.evaluate import zeroshot  # noqa: PLC0415

  if suite not in benchmarks.SUITES:
    raise ValueError(f"Unknown suite {suite!r}; known: {sorted(benchmarks.SUITES)}.")
  data_dir = (data_dir or config.evals.zeroshot.data_dir or config.data.data_dir
              or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets"))
  out = {"suite": suite, "data_dir": data_dir, "transform": eval_datasets.eval_transform_name(
      config), "datasets": {}, "not_prepared": {}}
  for dataset in benchmarks.SUITES[suite]:
    try:
      datasets.prepare_dataset(dataset, data_dir, builtin=False)
    except FileNotFoundError:
      out["not_prepared"][dataset] = build_command(dataset, data_dir)
      logging.info("Suite %s: %s is not prepared in %s, skipped.", suite, dataset, data_dir)
      continue
    evaluator = zeroshot.ZeroShotEvaluator(dataset, suite_eval_config(config, dataset, data_dir),
                                           config, tokenizer, mesh, graphdef)
    metrics = evaluator.evaluate(state["params"], state["model_state"])
    out["datasets"][dataset] = {
        "split": evaluator.split, "classes": len(evaluator.class_names),
        **{key.split("/", 1)[1]: value for key, value in metrics.items()}}
    logging.info("Suite %s: %s top-1 %.2f%%.", suite, dataset, metrics[f"{dataset}/top1"])
  top1 = [m["top1"] for m in out["datasets"].values()]
  out["mean_top1"] = sum(top1) / len(top1) if top1 else None
  return out


def evaluate_workdir(config, workdir: str, step: int | None, suite: str,
                     data_dir: str | None = None) -> tuple[int, dict[str, Any]]:
  """`run_suite` on a workdir's checkpoint (the latest, or `step`): (step, results)."""
  from xclip_jax.evaluate import runner  # noqa: PLC0415
  step, tokenizer, mesh, graphdef, restored = runner.restore(config, workdir, step)
  return step, run_suite(suite, config, tokenizer, mesh, graphdef, restored, data_dir)


def scalars(results: dict[str, Any]) -> dict[str, float]:
  """The suite's numbers as flat TensorBoard scalars: <suite>/<dataset>/<metric>."""
  flat = {f"{results['suite']}/{d}/{k}": float(v) for d, m in results["datasets"].items()
          for k, v in m.items() if k != "split"}
  if results["mean_top1"] is not None:
    flat[f"{results['suite']}/mean_top1"] = float(results["mean_top1"])
  return flat


def format_table(results: dict[str, Any]) -> str:
  """A plain-text table of the suite's results, then the datasets that were not prepared."""
  rows = [("dataset", "split", "classes", "images", "top-1", "top-5", "skipped")]
  for dataset, m in results["datasets"].items():
    rows.append((dataset, m["split"], str(m["classes"]), str(int(m["examples"])),
                 f"{m['top1']:.2f}", f"{m['top5']:.2f}", str(int(m["skipped"]))))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  text = [f"suite {results['suite']} (transform {results['transform']}, data_dir "
          f"{results['data_dir']})", line(rows[0]), "  ".join("-" * w for w in widths)]
  text += [line(r) for r in rows[1:]]
  if results["mean_top1"] is not None:
    text.append(f"mean top-1 over {len(results['datasets'])} datasets: "
                f"{results['mean_top1']:.2f}")
  if results["not_prepared"]:
    text.append("not prepared (skipped); prepare with:")
    text += [f"  {command}" for command in results["not_prepared"].values()]
  return "\n".join(text)
