"""Builds the evaluators a config asks for (`config.evals.<name>`) and runs them on a train state."""

from __future__ import annotations

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
  results = {}
  for evaluator in evaluators:
    results.update(evaluator.evaluate(state["params"], state["model_state"]))
  return results
