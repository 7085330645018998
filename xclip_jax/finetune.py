"""`config.init_from`: start a run from another checkpoint's model parameters (fine-tuning).

Only parameters move: the step, the optimizer state, the method's state (queues) and the RNG of
the new run start fresh. Every parameter the new model shares with the checkpoint (same path) must
have the same shape; parameters only the new model has (e.g. DeCLIP's heads on top of an imported
CLIP) keep their fresh initialisation, and checkpoint parameters the new model lacks are ignored,
both with a warning.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
from absl import logging

from xclip_jax import checkpoint as ckpt_lib


def parse_init_from(init_from: str) -> tuple[str, int | None]:
  """(workdir, step or None for the latest) of '<workdir>' or '<workdir>/checkpoints/<step>'."""
  path = init_from.rstrip("/")
  match = re.fullmatch(r"(.*)/checkpoints/(\d+)", path)
  if match:
    return match.group(1) or "/", int(match.group(2))
  return path, None


def _name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _flat(tree: Any, is_leaf=None) -> dict[str, Any]:
  return {_name(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, leaf in flat.items():
    node = tree
    *parents, last = name.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return tree


def default_workdir(init_from: str) -> str:
  """Where a fine-tuning run goes without --workdir: workdirs/finetune_<source>[_step<N>], a new
  workdir beside the source, never the source itself (which is only read)."""
  source, step = parse_init_from(init_from)
  name = source.rstrip("/").rsplit("/", 1)[-1] or "root"
  return os.path.join("workdirs", f"finetune_{name}" + (f"_step{step}" if step is not None else ""))


def _same_place(a: str, b: str) -> bool:
  if "://" in a or "://" in b:
    return a.rstrip("/") == b.rstrip("/")
  return os.path.realpath(a) == os.path.realpath(b)


def check_not_source(workdir: str, init_from: str) -> None:
  """A fine-tuning run never resumes or writes into the run its parameters come from."""
  if init_from and _same_place(workdir, parse_init_from(init_from)[0]):
    raise ValueError(f"--workdir={workdir} is the run config.init_from={init_from} starts from: "
                     "fine-tuning would resume or overwrite it. Pass a new --workdir (without it, "
                     f"the default is {default_workdir(init_from)}).")


def check_not_imported(workdir: str) -> None:
  """Runs save from step 1 on; a step-0 checkpoint is an imported model, which must not be
  'resumed' (that would train a fresh model beside it): say how to fine-tune it instead."""
  from etils import epath  # Orbax's path library: local paths and gs:// alike
  checkpoints = epath.Path(ckpt_lib.checkpoint_dir(workdir))
  if (checkpoints / "0").exists() and not any(
      p.name.isdigit() and int(p.name) > 0 for p in checkpoints.iterdir()):
    raise ValueError(f"{workdir} holds an imported model (a step-0 checkpoint), not a run to "
                     f"resume: fine-tune it into a new workdir with --config.init_from={workdir} "
                     f"(or --config=configs/finetune.py:{workdir}).")


def init_params(init_from: str, params: dict[str, Any]) -> dict[str, Any]:
  """`params` (sharded arrays) with every leaf the checkpoint also has replaced by its value."""
  workdir, step = parse_init_from(init_from)
  if "://" not in workdir and not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"config.init_from={init_from!r}: no checkpoints/ under {workdir}.")
  step, stored = ckpt_lib.param_shapes(workdir, step)
  stored, ours = _flat(stored, is_leaf=lambda x: isinstance(x, tuple)), _flat(params)
  mismatched = [f"  {name}: checkpoint {stored[name]}, this run {tuple(ours[name].shape)}"
                for name in ours if name in stored and tuple(stored[name]) != ours[name].shape]
  if mismatched:
    raise ValueError(
        f"config.init_from={init_from}: {len(mismatched)} parameters differ in shape between the "
        "checkpoint and this run's model. The model fields of the config (config.model.*) must "
        f"match the checkpoint's: start from its saved config, --config=configs/finetune.py:"
        f"{workdir}\n" + "\n".join(mismatched[:10]))
  common = [name for name in ours if name in stored]
  if not common:
    raise ValueError(f"config.init_from={init_from}: no parameter of this run's model is in the "
                     "checkpoint (different model family?).")
  fresh = sorted(set(ours) - set(stored))
  unused = sorted(set(stored) - set(ours))
  if fresh:
    logging.warning("init_from: %d parameters are not in the checkpoint and keep their fresh "
                    "initialisation: %s", len(fresh), fresh[:8])
  if unused:
    logging.warning("init_from: %d checkpoint parameters are not in this model and are ignored: "
                    "%s", len(unused), unused[:8])
  abstract = _unflatten({name: jax.ShapeDtypeStruct(ours[name].shape, ours[name].dtype,
                                                    sharding=ours[name].sharding)
                         for name in common})
  _, restored = ckpt_lib.restore_model(workdir, step, {"params": abstract})
  loaded = _flat(restored["params"])
  logging.info("init_from: %d of %d parameters from %s (step %d).", len(loaded), len(ours),
               workdir, step)
  return jax.tree_util.tree_map_with_path(lambda path, leaf: loaded.get(_name(path), leaf), params)
