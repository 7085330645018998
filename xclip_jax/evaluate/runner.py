"""Builds the evaluators a config asks for (`config.evals.<name>`) and runs them on a train state;
restores a workdir's model for evaluation and writes results (the standalone CLI's parts)."""

from __future__ import annotations

import json
import re
from typing import Any

import jax
import ml_collections
from absl import logging

from xclip_jax.evaluate import linear_probe, retrieval, zeroshot

EVALUATOR_TYPES = {"zeroshot": zeroshot.ZeroShotEvaluator,
                   "retrieval": retrieval.RetrievalEvaluator,
                   "linear_probe": linear_probe.LinearProbeEvaluator}


def build_evaluators(config, tokenizer, mesh: jax.sharding.Mesh, graphdef: Any) -> list[Any]:
  from xclip_jax.data import eval_image  # noqa: PLC0415  (TensorFlow only where data is read)
  eval_image.check_transform(config.evals.get("transform", "resize_256_crop_224"))
  evaluators = []
  for name, eval_cfg in config.evals.items():
    if not isinstance(eval_cfg, ml_collections.ConfigDict):
      continue                      # settings of every evaluator (config.evals.transform)
    if not eval_cfg.get("enabled", True):
      continue
    if eval_cfg.type not in EVALUATOR_TYPES:
      raise ValueError(f"config.evals.{name}.type={eval_cfg.type!r} is not one of "
                       f"{sorted(EVALUATOR_TYPES)}.")
    if not eval_cfg.dataset:        # default: the training dataset (its held-out split)
      eval_cfg = ml_collections.ConfigDict(eval_cfg.to_dict())
      eval_cfg.dataset = config.data.name
    evaluators.append(EVALUATOR_TYPES[eval_cfg.type](name, eval_cfg, config, tokenizer, mesh,
                                                     graphdef))
    logging.info("Evaluator %s (%s) ready.", name, eval_cfg.type)
  return evaluators


def run_evaluators(evaluators: list[Any], state: dict[str, Any]) -> dict[str, float]:
  """Every evaluator on `state`'s params; where the state has an EMA of them (config.ema_decay),
  on that too, under ema/<key> beside each raw result."""
  from xclip_jax import ema  # noqa: PLC0415
  results = {}
  for evaluator in evaluators:
    results.update(evaluator.evaluate(state["params"], state["model_state"]))
    if ema.KEY in state:
      results.update(ema.prefixed(evaluator.evaluate(state[ema.KEY], state["model_state"])))
  return results


def restore(config, workdir: str, step: int | None):
  """(step, tokenizer, mesh, graphdef, {"params", "model_state"[, "ema_params"]}) of a workdir's
  checkpoint; "ema_params" where the run kept an EMA (config.ema_decay > 0)."""
  from xclip_jax import checkpoint, ema  # noqa: PLC0415
  from xclip_jax import methods  # noqa: PLC0415
  from xclip_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415
  from xclip_jax.parallel import mesh as mesh_lib  # noqa: PLC0415

  mesh = mesh_lib.make_mesh(config.mesh)
  tokenizer = tokenizer_lib.resolve_tokenizer(config)
  model_fn = lambda: methods.build_model(config, eos_id=tokenizer.spec.eos_id, seed=config.seed)
  graphdef, abstract_params, abstract_rest = mesh_lib.abstract_model(model_fn, mesh)
  abstract = {"params": abstract_params, "model_state": abstract_rest}
  if ema.decay_of(config) > 0:      # evaluated beside the parameters, as in the train loop
    abstract[ema.KEY] = abstract_params
  step, restored = checkpoint.restore_model(workdir, step, abstract)
  return step, tokenizer, mesh, graphdef, restored


def write_results(workdir: str, step: int, results: dict[str, Any],
                  scalars: dict[str, float] | None = None, name: str = "") -> str:
  """<workdir>/eval/step_<N>[_<name>].json (written atomically) and TensorBoard scalars
  (`scalars`, default: results); process 0 only."""
  from clu import metric_writers  # noqa: PLC0415
  from etils import epath  # noqa: PLC0415  (local paths and gs:// alike)
  path = epath.Path(workdir) / "eval" / f"step_{step}{'_' + name if name else ''}.json"
  if jax.process_index() != 0:
    return str(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps({"step": step, **results}, indent=2, sort_keys=True))
  tmp.replace(path)      # atomic; overwrites an earlier evaluation of this step
  writer = metric_writers.SummaryWriter(workdir)
  writer.write_scalars(step, results if scalars is None else scalars)
  writer.close()
  return str(path)


def apply_named_datasets(config, argv: list[str]) -> list[str]:
  """An evaluator whose dataset the command line names is enabled, and a zero-shot one takes
  that dataset's own split, templates and class names ("auto"; benchmarks.py), except for what
  the command line also sets: --config.evals.zeroshot.dataset=imagenet2012 is enough, whatever
  the workdir's config held for the dataset it evaluated before. Returns the changes made."""
  line = " ".join(argv)
  given = lambda name, field: re.search(rf"--config\.evals\.{name}\.{field}\b", line)
  changes = []
  for name in sorted(set(re.findall(r"--config\.evals\.(\w+)\.dataset\b", line))):
    if name not in config.evals or not isinstance(config.evals[name], type(config.evals)):
      continue
    eval_cfg = config.evals[name]
    defaults = {"enabled": True}
    if eval_cfg.get("type") == "zeroshot":
      defaults.update(split="auto", templates="auto", class_names=())
    for field, value in defaults.items():
      if not given(name, field) and eval_cfg.get(field) != value:
        eval_cfg[field] = value
        changes.append(f"config.evals.{name}.{field}={value!r}")
  return changes
