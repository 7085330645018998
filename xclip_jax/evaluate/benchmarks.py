"""The standard zero-shot benchmarks by TFDS name: curated class names, prompt templates, the
evaluation split and the class subset, from the package data in zeroshot_data/ (its README.md
gives the sources, the licences and how each label order was checked); and suites of them.

`zeroshot_setup` decides what a zero-shot evaluator uses, in this order:
  class names  config's class_names=... > the curated entry > the TFDS ClassLabel's names, unless
               those look like ids (WordNet ids, integers): then an error that says what to pass;
  templates    a named set (templates.TEMPLATE_SETS, or a curated entry's key) > "auto": the
               curated entry's, else the dataset's own set (the demo's), else OpenAI's 80
               ImageNet templates (as clip_benchmark falls back);
  split        a named split > "auto": the curated entry's evaluation split, else "test".
Imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Sequence

from absl import logging

from xclip_jax.evaluate import templates as templates_lib

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zeroshot_data")

SUITES = {
    "imagenet": ("imagenet2012", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"),
    # clip_benchmark's zero-shot classification set, as far as TFDS has the datasets.
    "clip_benchmark": ("imagenet2012", "imagenet_v2", "imagenet_sketch", "imagenet_a",
                       "imagenet_r", "cifar10", "cifar100", "stl10", "food101",
                       "oxford_iiit_pet", "oxford_flowers102", "caltech101", "dtd", "eurosat",
                       "sun397"),
}
# templates="auto" for datasets with no curated entry but a set of their own.
OWN_TEMPLATES = {"xclip_demo": "demo"}
# Preparing these needs files the user downloads by hand (tfds build says where).
MANUAL_DOWNLOAD = {"imagenet2012": "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"}


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A TFDS dataset's curated zero-shot entry."""
  dataset: str                        # TFDS name, without config or version
  label_space: str                    # zeroshot_data/<label_space>.json
  classes: tuple[str, ...]            # every TFDS label's name, in TFDS's label order
  templates: tuple[str, ...]
  split: str                          # the published evaluation split
  class_subset: tuple[int, ...] | None   # the TFDS labels that compete (None: all)
  unlabelled_splits: tuple[str, ...]
  tfds_label_names: tuple[str, ...] | None

  @property
  def competing_classes(self) -> tuple[str, ...]:
    if self.class_subset is None:
      return self.classes
    return tuple(self.classes[i] for i in self.class_subset)


def base_name(dataset: str) -> str:
  """'imagenet_v2/matched-frequency:3.0.0' -> 'imagenet_v2'."""
  return dataset.split(":")[0].split("/")[0]


@functools.cache
def _label_spaces() -> dict[str, dict]:
  spaces = {}
  for file in sorted(os.listdir(DATA_DIR)):
    if file.endswith(".json"):
      with open(os.path.join(DATA_DIR, file), encoding="utf-8") as f:
        spaces[file[:-len(".json")]] = json.load(f)
  return spaces


@functools.cache
def _benchmarks() -> dict[str, Benchmark]:
  out = {}
  for key, space in _label_spaces().items():
    for dataset, info in space["tfds"].items():
      subset = info.get("class_subset")
      names = space.get("tfds_label_names")
      out[dataset] = Benchmark(
          dataset=dataset, label_space=key, classes=tuple(space["classes"]),
          templates=tuple(space["templates"]), split=info["split"],
          class_subset=tuple(subset) if subset is not None else None,
          unlabelled_splits=tuple(info.get("unlabelled_splits", ())),
          tfds_label_names=tuple(names) if names else None)
  return out


def benchmark(dataset: str) -> Benchmark | None:
  """The curated entry of a TFDS dataset name (config and version ignored), if there is one."""
  return _benchmarks().get(base_name(dataset))


def eval_split(dataset: str, split: str = "auto") -> str:
  """`split`, or for "auto" (or "") the curated entry's evaluation split, else "test"."""
  if split and split != "auto":
    return split
  entry = benchmark(dataset)
  return entry.split if entry else "test"


def curated_datasets() -> list[str]:
  return sorted(_benchmarks())


def label_space_templates(name: str) -> tuple[str, ...] | None:
  """A curated entry's templates by its file name ('cifar10') or a TFDS name ('imagenet2012')."""
  if name in _label_spaces():
    return tuple(_label_spaces()[name]["templates"])
  entry = benchmark(name)
  return entry.templates if entry else None


def label_spaces() -> list[str]:
  return sorted(_label_spaces())


_WORDNET_ID = re.compile(r"n\d{8}")


def looks_like_ids(names: Sequence[str]) -> bool:
  """True when class names are WordNet ids or integers: no use as words in a prompt."""
  names = [str(n) for n in names]
  return bool(names) and (all(_WORDNET_ID.fullmatch(n) for n in names) or
                          all(n.strip().lstrip("-").isdigit() for n in names))


def _same_names(a: Sequence[str], b: Sequence[str]) -> bool:
  norm = lambda s: re.sub(r"[\s_]+", " ", s).strip().lower()
  return len(a) == len(b) and all(norm(x) == norm(y) for x, y in zip(a, b))


@dataclasses.dataclass(frozen=True)
class ZeroShotSetup:
  class_names: tuple[str, ...]        # the classes that compete, in label order
  templates: tuple[str, ...]
  split: str
  label_map: tuple[int, ...] | None   # TFDS label -> index in class_names (-1: not evaluated)
  source: str                         # where the names came from (for the log)


def zeroshot_setup(eval_name: str, eval_cfg, tfds_names: Sequence[str]) -> ZeroShotSetup:
  """Class names, templates, split and label map of a zero-shot evaluator (see module doc).

  `tfds_names` are the dataset's ClassLabel names as TFDS reports them (ids or integers when
  TFDS reads the names from the data files at preparation and the data are not there).
  """
  dataset = eval_cfg.dataset
  entry = benchmark(dataset)
  tfds_names = [str(n) for n in tfds_names]
  if entry is not None and len(tfds_names) != len(entry.classes):
    raise ValueError(f"{dataset} has {len(tfds_names)} classes, but its curated entry "
                     f"(zeroshot_data/{entry.label_space}.json) has {len(entry.classes)}: a "
                     "different TFDS version? Pass --config.evals."
                     f"{eval_name}.class_names=... to evaluate it.")
  if entry is not None and not looks_like_ids(tfds_names):
    # The dataset's own names are readable: they must be the ones the entry was ordered by.
    expected = entry.tfds_label_names or entry.classes
    if not (tuple(tfds_names) == expected or _same_names(tfds_names, entry.classes)):
      bad = next(i for i, (a, b) in enumerate(zip(tfds_names, expected)) if a != b)
      raise ValueError(f"{dataset}'s label {bad} is {tfds_names[bad]!r}, but the curated names "
                       f"were ordered for {expected[bad]!r}: the label order differs from "
                       "the one checked. Pass class_names=... in this dataset's label order.")

  label_map, source = None, "the TFDS ClassLabel"
  names = tuple(tfds_names)
  if entry is not None:
    names, source = entry.competing_classes, f"zeroshot_data/{entry.label_space}.json"
    if entry.class_subset is not None:
      position = {label: i for i, label in enumerate(entry.class_subset)}
      label_map = tuple(position.get(label, -1) for label in range(len(entry.classes)))
  override = tuple(eval_cfg.get("class_names", ()) or ())
  if override:
    if len(override) != len(names):
      raise ValueError(f"config.evals.{eval_name}.class_names has {len(override)} names; "
                       f"{dataset} has {len(names)} classes"
                       f"{' that compete' if label_map else ''}.")
    names, source = override, f"config.evals.{eval_name}.class_names"
  elif entry is None and looks_like_ids(names):
    raise ValueError(
        f"{dataset}'s class names are ids ({', '.join(names[:3])}, ...), which make no prompt, "
        f"and it has no curated entry (curated: {', '.join(curated_datasets())}). Pass the "
        f"{len(names)} names in label order: --config.evals.{eval_name}.class_names="
        "\"('name 0', 'name 1', ...)\".")

  template_name = eval_cfg.get("templates", "auto") or "auto"
  if template_name == "auto":
    own = OWN_TEMPLATES.get(base_name(dataset))
    templates = (entry.templates if entry else
                 get_templates(own) if own else templates_lib.CLIP80)
  else:
    templates = get_templates(template_name)
    if entry is not None and template_name == "demo":
      logging.warning("config.evals.%s.templates='demo' (the demo dataset's prompts) on %s, "
                      "which has curated templates: --config.evals.%s.templates=auto uses "
                      "them.", eval_name, dataset, eval_name)

  split = eval_split(dataset, eval_cfg.get("split", "auto"))
  if entry is not None and split.split("[")[0] in entry.unlabelled_splits:
    raise ValueError(f"{dataset}'s {split!r} split has no labels; its zero-shot split is "
                     f"{entry.split!r}: --config.evals.{eval_name}.split={entry.split} (or "
                     "=auto).")
  return ZeroShotSetup(names, tuple(templates), split, label_map, source)


def get_templates(name: str) -> tuple[str, ...]:
  """A set of templates.py (demo, short, clip80), or a curated benchmark's templates by its label
  space ('imagenet1k', 'cifar10', ...) or TFDS name ('imagenet2012'). "auto" names a dataset's
  own set where a dataset is known (zeroshot_setup); alone, it is CLIP80."""
  if name in templates_lib.TEMPLATE_SETS:
    return templates_lib.TEMPLATE_SETS[name]
  if name == "auto":
    return templates_lib.CLIP80
  curated = label_space_templates(name)
  if curated is None:
    raise ValueError(f"Unknown template set {name!r}; known: {sorted(templates_lib.TEMPLATE_SETS)} "
                     f"and the curated {label_spaces()}.")
  return curated
