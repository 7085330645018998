"""Writes xclip_jax/evaluate/zeroshot_data/*.json: zero-shot class names and prompt templates of
the standard benchmarks, in the label order of their TFDS datasets, from the published sources.

Not library code: run it by hand when a source or TFDS changes, then review the diff.

  pip download --no-deps open_clip_torch==3.3.0 clip_benchmark==1.6.2 -d /tmp/wheels
  python tools/make_zeroshot_metadata.py --open_clip_wheel=/tmp/wheels/open_clip_torch-3.3.0-... \
      --clip_benchmark_wheel=/tmp/wheels/clip_benchmark-1.6.2-... --openai_prompts=prompts.md

Sources (all MIT licensed; their notices are copied beside the data):
  * open_clip_torch 3.3.0, open_clip/zero_shot_metadata.py: OpenAI's cleaned ImageNet-1k class
    names and the 80 ImageNet templates of OpenAI's prompt-engineering notebook.
  * clip_benchmark 1.6.2, clip_benchmark/datasets/en_classnames.json and
    en_zeroshot_classification_templates.json (the per-dataset templates are OpenAI's), and the
    ImageNet-A / ImageNet-R WordNet-id subsets in clip_benchmark/datasets/builder.py.
  * OpenAI CLIP, data/prompts.md (the paper's class names and templates): CIFAR-10/100, STL-10,
    Food-101, SUN397 and DTD names, for which clip_benchmark reads names from the dataset files.
Nothing is executed from the sources: Python files are parsed with `ast`, JSON is read.

Every list is mapped into TFDS's label order (the ClassLabel names TFDS ships, read from the
installed tensorflow_datasets) by matching normalised names; the script asserts each mapping is
a bijection and records in each file how the order was established.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "xclip_jax", "evaluate", "zeroshot_data")
OPEN_CLIP = "open_clip_torch 3.3.0 (PyPI), open_clip/zero_shot_metadata.py"
CLIP_BENCHMARK = "clip_benchmark 1.6.2 (PyPI), clip_benchmark/datasets/"
OPENAI = "OpenAI CLIP repository, data/prompts.md"
# TFDS EuroSAT folder names -> OpenAI's names (a meaning, not a spelling, so written out here);
# checked below against both clip_benchmark's order and OpenAI's set.
EUROSAT = {"AnnualCrop": "annual crop land", "Forest": "forest",
           "HerbaceousVegetation": "brushland or shrubland", "Highway": "highway or road",
           "Industrial": "industrial buildings or commercial buildings",
           "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
           "Residential": "residential buildings or homes or apartments", "River": "river",
           "SeaLake": "lake or sea"}


def _read(wheel: str, member: str) -> str:
  with zipfile.ZipFile(wheel) as z:
    return z.read(member).decode("utf-8")


def _literal_assignments(source: str) -> dict:
  """Module-level (and nested) `NAME = <literal>` assignments of a Python file, unexecuted."""
  out = {}
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
        node.targets[0], ast.Name):
      try:
        out[node.targets[0].id] = ast.literal_eval(node.value)
      except ValueError:
        if isinstance(node.value, ast.Tuple):          # a tuple of `lambda c: f'...{c}...'`
          out[node.targets[0].id] = [_lambda_template(e) for e in node.value.elts]
  return out


def _lambda_template(node: ast.AST) -> str:
  body = node.body
  assert isinstance(node, ast.Lambda) and isinstance(body, ast.JoinedStr), ast.dump(node)
  return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in body.values)


def _openai_prompts(path: str) -> dict[str, tuple[list[str], list[str]]]:
  text = open(path, encoding="utf-8").read()
  out = {}
  for section in re.split(r"^## ", text, flags=re.M)[1:]:
    m = re.search(r"classes = (\[.*?\])\n\ntemplates = (\[.*?\])", section, re.S)
    if m:
      out[section.split("\n", 1)[0].strip()] = (ast.literal_eval(m.group(1)),
                                                ast.literal_eval(m.group(2)))
  return out


def _norm(name: str) -> str:
  return re.sub(r"[\s_/\-]+", " ", name).strip().lower()


def _tfds_names(name: str) -> list[str]:
  import tensorflow_datasets as tfds
  return list(tfds.builder(name, data_dir="/nonexistent").info.features["label"].names)


def _map_by_name(tfds_names, names) -> list[str]:
  """`names` reordered to TFDS's order by matching normalised spellings (a bijection)."""
  by_key = {_norm(n): n for n in names}
  assert len(by_key) == len(names), "names collide after normalisation"
  out = [by_key[_norm(t)] for t in tfds_names]
  assert sorted(out) == sorted(names)
  return out


def build(args) -> dict[str, dict]:
  oc = _literal_assignments(_read(args.open_clip_wheel, "open_clip/zero_shot_metadata.py"))
  cb_dir = "clip_benchmark/datasets/"
  cb_names = json.loads(_read(args.clip_benchmark_wheel, cb_dir + "en_classnames.json"))
  cb_templates = {k: [t.replace("{c}", "{}") for t in v] for k, v in json.loads(_read(
      args.clip_benchmark_wheel, cb_dir + "en_zeroshot_classification_templates.json")).items()}
  cb_builder = _literal_assignments(_read(args.clip_benchmark_wheel, cb_dir + "builder.py"))
  openai = _openai_prompts(args.openai_prompts)
  entries = {}

  def entry(key, classes, templates, tfds, order, names_from, templates_from, tfds_names=None):
    # OpenAI's ImageNet list names two pairs of classes alike (657/744 'missile', 836/837
    # 'sunglasses'); the published protocol keeps them, so do we.
    assert len(set(classes)) == len(classes) - (2 if key == "imagenet1k" else 0), key
    assert all(t.count("{}") == 1 for t in templates), key
    used = " ".join((names_from, templates_from, order))
    marks = (("openai_clip", "OpenAI CLIP"), ("open_clip", "open_clip_torch"),
             ("clip_benchmark", "clip_benchmark"))
    notices = [f"LICENSE.{n}" for n, mark in marks if mark in used]
    entries[key] = {"classes": classes, "templates": templates, "tfds": tfds,
                    "tfds_label_names": tfds_names, "label_order": order,
                    "names_from": names_from, "templates_from": templates_from,
                    "licence": f"MIT; notices in {', '.join(notices)} beside this file"}

  # ImageNet-1k and the datasets that share its label space.
  wnids = _tfds_names("imagenet2012")
  assert wnids == sorted(wnids) == cb_builder["all_imagenet_wordnet_ids"]
  for name in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
    assert _tfds_names(name) == wnids, name
  names = list(oc["IMAGENET_CLASSNAMES"])
  assert names == cb_names["imagenet1k"] and len(names) == 1000
  templates = oc["OPENAI_IMAGENET_TEMPLATES"]
  assert templates == cb_templates["imagenet1k"] and len(templates) == 80
  subset = lambda ids: [i for i, w in enumerate(wnids) if w in set(ids)]
  a, r = subset(cb_builder["imagenet_a_wnids"]), subset(cb_builder["imagenet_r_wnids"])
  assert len(a) == len(r) == 200
  entry("imagenet1k", names, templates, {
      "imagenet2012": {"split": "validation", "unlabelled_splits": ["test"]},
      "imagenet_v2": {"split": "test"}, "imagenet_sketch": {"split": "test"},
      "imagenet_a": {"split": "test", "class_subset": a},
      "imagenet_r": {"split": "test", "class_subset": r}},
      "TFDS's 1,000 labels are the sorted WordNet ids (datasets/imagenet2012/labels.txt), equal "
      "to clip_benchmark's all_imagenet_wordnet_ids, the order of OpenAI's names; imagenet_v2, "
      "imagenet_sketch, imagenet_a and imagenet_r use the same 1,000-label space. ImageNet-A/-R "
      "hold 200 classes: class_subset lists their label indices (clip_benchmark's "
      "imagenet_a_wnids / imagenet_r_wnids), and only those classes compete.",
      OPEN_CLIP + " (IMAGENET_CLASSNAMES; equal to clip_benchmark's imagenet1k)",
      OPEN_CLIP + " (OPENAI_IMAGENET_TEMPLATES; equal to clip_benchmark's imagenet1k)", wnids)

  # Datasets whose TFDS names come from the data files at preparation time (not shipped).
  for key, title in (("cifar10", "CIFAR10"), ("cifar100", "CIFAR100"), ("stl10", "STL10")):
    classes, templates = openai[title]
    assert templates == cb_templates[key], key
    entry(key, classes, templates, {key: {"split": "test"}},
          "TFDS reads the names from the dataset's own meta file when preparing it (not shipped "
          "with TFDS), in the file's order, which is the order of OpenAI's list and of "
          "torchvision. Checked at evaluation time: a prepared dataset's names must equal these "
          "up to '_' -> ' '.", OPENAI, CLIP_BENCHMARK + "en_zeroshot_classification_templates"
          ".json (equal to OpenAI's)")

  for key, title, split in (("food101", "Food101", "validation"), ("sun397", "SUN397", "test"),
                            ("dtd", "DescribableTextures", "test")):
    tfds_names = _tfds_names(key)
    classes, templates = openai[title]
    # SUN397's TFDS labels are paths such as '/a/apartment_building/outdoor': match the part
    # after the leading '/a/'.
    keys = [t[3:] for t in tfds_names] if key == "sun397" else tfds_names
    ordered = _map_by_name(keys, classes)
    assert templates == cb_templates[key], key
    moved = sum(a != b for a, b in zip(ordered, classes))
    path = "the path after its leading '/x/', " if key == "sun397" else ""
    entry(key, ordered, templates, {key: {"split": split}},
          f"OpenAI's names matched one to one to TFDS's label names ({path}'_', '/', '-' as "
          f"spaces, case ignored) and stored in TFDS's order; {moved} names are at a different "
          "index than in OpenAI's list.", OPENAI,
          CLIP_BENCHMARK + "en_zeroshot_classification_templates.json (equal to OpenAI's)",
          tfds_names)

  # Datasets whose names clip_benchmark ships too (a second source, for the order).
  cb_t = CLIP_BENCHMARK + "en_zeroshot_classification_templates.json (equal to OpenAI's)"
  pets = _tfds_names("oxford_iiit_pet")
  pet_names = _map_by_name(pets, openai["OxfordPets"][0])
  assert [_norm(n) for n in pet_names] == [_norm(n) for n in cb_names["pets"]]
  flowers = _tfds_names("oxford_flowers102")
  assert cb_names["flowers"] == openai["Flowers102"][0]
  renamed = [(t, n) for t, n in zip(flowers, cb_names["flowers"]) if _norm(t) != _norm(n)]
  assert renamed == [("pink-yellow dahlia?", "pink and yellow dahlia"), ("ball moss", "air plant")]
  caltech = cb_names["caltech101_vtab"]
  assert sorted(caltech) == sorted(openai["Caltech101"][0])
  eurosat = _tfds_names("eurosat")
  assert [EUROSAT[t] for t in eurosat] == cb_names["eurosat"]
  assert sorted(EUROSAT.values()) == sorted(openai["EuroSAT"][0])
  for key, title, names, order, split in (
      ("oxford_iiit_pet", "OxfordPets", pet_names,
       "OpenAI's names (the dataset's own spelling: cats capitalised, dogs not) matched one to "
       "one to TFDS's label names ('_' as ' ', case ignored) and stored in TFDS's order, which "
       "is also clip_benchmark's (torchvision's, title-cased) order; OpenAI lists them in "
       "another order.", "test"),
      ("oxford_flowers102", "Flowers102", cb_names["flowers"],
       "TFDS, OpenAI and clip_benchmark follow the dataset's label index; 100 of 102 names "
       "equal TFDS's, OpenAI renamed 'pink-yellow dahlia?' and 'ball moss' (same indices).",
       "test"),
      ("caltech101", "Caltech101", caltech,
       "clip_benchmark's caltech101_vtab list (OpenAI's names in VTAB's order; VTAB reads TFDS "
       "caltech101) is TFDS's sorted label order; it keeps TFDS's background_google class as "
       "'background', as OpenAI's 102-class protocol does.", "test"),
      ("eurosat", "EuroSAT", cb_names["eurosat"],
       "TFDS's labels are the sorted folder names, which is clip_benchmark's (torchvision's) "
       "order; the OpenAI name of each folder is written out in "
       "tools/make_zeroshot_metadata.py and checked against clip_benchmark's order and "
       "OpenAI's set. TFDS has only a train split.", "train")):
    templates = openai[title][1]
    assert templates == cb_templates[{"OxfordPets": "pets", "Flowers102": "flowers",
                                      "Caltech101": "caltech101", "EuroSAT": "eurosat"}[title]]
    source = OPENAI + (" (order: clip_benchmark 1.6.2 en_classnames.json caltech101_vtab)"
                       if key == "caltech101" else "")
    entry(key, names, templates, {key: {"split": split}}, order, source, cb_t,
          _tfds_names(key))
  return entries


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--open_clip_wheel", required=True)
  parser.add_argument("--clip_benchmark_wheel", required=True)
  parser.add_argument("--openai_prompts", required=True, help="OpenAI CLIP's data/prompts.md")
  args = parser.parse_args()
  entries = build(args)
  os.makedirs(OUT, exist_ok=True)
  for key, value in entries.items():
    with open(os.path.join(OUT, f"{key}.json"), "w", encoding="utf-8") as f:
      json.dump(value, f, indent=1, ensure_ascii=False)
      f.write("\n")
    print(f"{key}: {len(value['classes'])} classes, {len(value['templates'])} templates, "
          f"TFDS {sorted(value['tfds'])}")


if __name__ == "__main__":
  main()
