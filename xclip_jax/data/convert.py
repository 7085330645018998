"""Convert your own image-text pairs into a TFDS dataset the train pipeline reads.

  # img2dataset / webdataset output: one output shard per tar shard
  python -m xclip_jax.data.convert --tar='/data/cc3m/{00000..00331}.tar' \
      --name=cc3m --data_dir=/data/tfds [--max_side=384] [--workers=16]
  # a folder of images with a CSV (or TSV) of image path + caption
  python -m xclip_jax.data.convert --csv=/data/pets/captions.csv --image_column=file \
      --caption_column=caption --name=pets --data_dir=/data/tfds

Then train with --config.data.name=cc3m --config.data.data_dir=/data/tfds
--config.data.builtin=False --config.data.text_key=caption (docs/data.md walks through it).

Every pair is cleaned (pairs/pair_cleaning.py): images become RGB JPEGs (resized to --max_side
if asked), captions non-empty UTF-8; pairs that cannot be used are skipped and counted by reason.
Shards are converted in parallel worker processes; each finished shard is renamed into place with
its counts, so an interrupted conversion resumes by skipping finished shards (a half-written
temporary file is discarded). dataset_info.json is written last: until then TFDS does not see a
dataset, so a partial conversion can never be trained on by mistake. The summary (pairs written,
skipped and converted by reason) is printed and saved as convert_summary.json.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import multiprocessing
import os
import re
import sys
from typing import Any

from xclip_jax.data.pairs import pair_cleaning
from xclip_jax.data.pairs import pair_dataset
from xclip_jax.data.pairs import pair_sources

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


@dataclasses.dataclass(frozen=True)
class Task:
  """One input shard -> one output shard: a tar file, or rows [start, stop) of a CSV."""
  index: int
  kind: str          # "tar" | "csv"
  path: str
  start: int = 0
  stop: int = 0


@dataclasses.dataclass(frozen=True)
class Options:
  image: pair_cleaning.ImageOptions = pair_cleaning.ImageOptions()
  max_caption_chars: int = 1000
  image_column: str = "image"
  caption_column: str = "caption"
  image_root: str = ""
  delimiter: str = ""
  max_entry_bytes: int = pair_sources.MAX_ENTRY_BYTES


# ---- planning ------------------------------------------------------------------------------------

def _expand_braces(pattern: str) -> list[str]:
  """'a{00..02}.tar' -> a00.tar a01.tar a02.tar (webdataset's numeric ranges; zero padding kept)."""
  match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
  if not match:
    return [pattern]
  lo, hi = match.group(1), match.group(2)
  width = len(lo) if lo.startswith("0") else 0
  out = []
  for i in range(int(lo), int(hi) + 1):
    out += _expand_braces(pattern[:match.start()] + str(i).zfill(width) + pattern[match.end():])
  return out


def find_tar_shards(spec: str) -> list[str]:
  """Tar shards named by a comma-separated list of paths, globs, brace ranges or directories."""
  found: list[str] = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    for pattern in _expand_braces(os.path.expanduser(item)):
      if os.path.isdir(pattern):
        found += [p for p in glob.glob(os.path.join(pattern, "*")) if p.endswith(TAR_SUFFIXES)]
      elif glob.has_magic(pattern):
        found += glob.glob(pattern)
      elif os.path.exists(pattern):
        found.append(pattern)
      else:
        raise FileNotFoundError(f"--tar: {pattern} does not exist.")
  shards = sorted({os.path.abspath(p) for p in found})
  if not shards:
    raise FileNotFoundError(f"--tar={spec!r} matches no tar shard ({', '.join(TAR_SUFFIXES)}).")
  return shards


def plan_tasks(tar: str = "", csv: str = "", *, rows_per_shard: int = 10_000,
               options: Options = Options()) -> list[Task]:
  """The input shards, in a fixed order (the output shard numbers follow it)."""
  tasks: list[Task] = []
  if tar:
    tasks += [Task(len(tasks) + i, "tar", p) for i, p in enumerate(find_tar_shards(tar))]
  if csv:
    path = os.path.abspath(os.path.expanduser(csv))
    header = pair_sources.read_csv_header(path, options.delimiter)
    missing = [c for c in (options.image_column, options.caption_column) if c not in header]
    if missing:
      raise ValueError(f"{csv} has no column {missing} (header: {header}); set --image_column "
                       "/ --caption_column, or --delimiter for a file that is not comma/tab "
                       "separated.")
    rows = pair_sources.count_csv_rows(path, options.delimiter)
    for start in range(0, max(rows, 1), rows_per_shard):
      tasks.append(Task(len(tasks), "csv", path, start, min(start + rows_per_shard, rows)))
  if not tasks:
    raise ValueError("Nothing to convert: give --tar and/or --csv.")
  return tasks


# ---- one shard (runs in a worker process) --------------------------------------------------------

_WRITER: pair_dataset.ShardWriter | None = None


def convert_shard(task: Task, options: Options, directory: str, name: str,
                  num_shards: int) -> dict[str, Any]:
  """Cleans and writes one input shard; returns (and saves) its counts."""
  global _WRITER
  if _WRITER is None:
    _WRITER = pair_dataset.ShardWriter()
  skipped: collections.Counter = collections.Counter()
  converted: collections.Counter = collections.Counter()
  if task.kind == "tar":
    pairs = pair_sources.read_tar_shard(task.path, skipped, options.max_entry_bytes)
  else:
    pairs = pair_sources.read_csv_rows(
        task.path, task.start, task.stop, skipped, image_column=options.image_column,
        caption_column=options.caption_column, image_root=options.image_root,
        delimiter=options.delimiter, max_entry_bytes=options.max_entry_bytes)
  written = 0

  def records():
    nonlocal written
    for pair in pairs:
      caption = pair_cleaning.clean_caption(pair.caption, options.max_caption_chars)
      if caption.reason:   # cheap check first: no image decoding for a pair without a caption
        skipped[caption.reason] += 1
        continue
      image = pair_cleaning.clean_image(pair.image, options.image)
      if image.reason:
        skipped[image.reason] += 1
        continue
      converted.update(caption.fixes + image.fixes)
      written += 1
      yield pair.key, _WRITER.serialize(image.value, caption.value, pair.key)

  path = pair_dataset.shard_path(directory, name, task.index, num_shards)
  num_bytes = _WRITER.write(path + ".partial", records())
  stats = {"input": task.path, "rows": [task.start, task.stop] if task.kind == "csv" else None,
           "written": written, "num_bytes": num_bytes,
           "skipped": dict(sorted(skipped.items())), "converted": dict(sorted(converted.items()))}
  # Counts first, records second: a shard counts as done only once both are in place.
  pair_dataset.write_json_atomically(pair_dataset.stats_path(directory, task.index), stats)
  os.replace(path + ".partial", path)
  return stats


# ---- the whole conversion ------------------------------------------------------------------------

def _manifest(tasks: list[Task], options: Options) -> dict[str, Any]:
  return {"inputs": [[t.kind, t.path, t.start, t.stop] for t in tasks],
          "options": dataclasses.asdict(options)}


def _check_manifest(directory: str, manifest: dict[str, Any]) -> None:
  import json  # noqa: PLC0415
  path = os.path.join(directory, pair_dataset.MANIFEST)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    if previous != json.loads(json.dumps(manifest)):
      raise ValueError(
          f"{directory} holds a conversion of other inputs or options ({path}). Resume with the "
          "same flags, or convert into a new --name/--version (or delete that directory).")
  pair_dataset.write_json_atomically(path, manifest)


def _remove_partial_files(directory: str) -> int:
  """Temporary files of an interrupted run: never complete, never read, removed."""
  stale = (glob.glob(os.path.join(directory, "*.partial*")) + glob.glob(
      os.path.join(directory, "*.tmp-*")) + glob.glob(
          os.path.join(directory, pair_dataset.SHARD_STATS_DIR, "*.tmp-*")))
  for path in stale:
    os.remove(path)
  return len(stale)


def summarize(shard_stats: list[dict[str, Any]]) -> dict[str, Any]:
  skipped, converted = collections.Counter(), collections.Counter()
  for s in shard_stats:
    skipped.update(s["skipped"])
    converted.update(s["converted"])
  return {"shards": len(shard_stats), "written": sum(s["written"] for s in shard_stats),
          "skipped_total": sum(skipped.values()), "skipped": dict(sorted(skipped.items())),
          "converted": dict(sorted(converted.items())),
          "num_bytes": sum(s["num_bytes"] for s in shard_stats)}


def convert(tasks: list[Task], *, name: str, data_dir: str, version: str = "1.0.0",
            options: Options = Options(), workers: int = 0, progress: bool = True
            ) -> dict[str, Any]:
  """Converts every task not already done, then writes dataset_info.json and the summary.

  workers=0 converts in this process; N > 0 uses N spawned worker processes.
  """
  import json  # noqa: PLC0415
  from tqdm import tqdm  # noqa: PLC0415

  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"--name={name!r}: TFDS names are lower_snake_case (a-z, 0-9, _).")
  directory = pair_dataset.version_dir(data_dir, name, version)
  os.makedirs(os.path.join(directory, pair_dataset.SHARD_STATS_DIR), exist_ok=True)
  _check_manifest(directory, _manifest(tasks, options))
  _remove_partial_files(directory)
  n = len(tasks)
  todo = [t for t in tasks if not pair_dataset.shard_done(directory, name, t.index, n)]
  resumed = n - len(todo)

  bar = tqdm(total=n, initial=resumed, unit="shard", desc=f"convert {name}", disable=not progress,
             file=sys.stderr)
  totals: collections.Counter = collections.Counter()

  def done(stats):
    totals.update(written=stats["written"], skipped=sum(stats["skipped"].values()))
    bar.set_postfix(pairs=totals["written"], skipped=totals["skipped"], refresh=False)
    bar.update(1)

  args = [(t, options, directory, name, n) for t in todo]
  if workers <= 0 or len(todo) <= 1:
    for a in args:
      done(convert_shard(*a))
  else:
    context = multiprocessing.get_context("spawn")   # never fork a process that imported TF
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), context) as pool:
      futures = [pool.submit(convert_shard, *a) for a in args]
      try:
        for future in concurrent.futures.as_completed(futures):
          done(future.result())
      except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
  bar.close()

  shard_stats = []
  for t in tasks:
    with open(pair_dataset.stats_path(directory, t.index), encoding="utf-8") as f:
      shard_stats.append(json.load(f))
  summary = summarize(shard_stats)
  summary.update(name=name, version=version, directory=directory, shards_resumed=resumed)
  inputs = collections.Counter(t.kind for t in tasks)
  description = ("Image-text pairs converted by xclip_jax.data.convert from "
                 + " and ".join(f"{k} {v} shard(s)" for k, v in sorted(inputs.items())) + ".")
  pair_dataset.write_dataset_info(directory, name, version,
                                  [s["written"] for s in shard_stats], summary["num_bytes"],
                                  description)
  pair_dataset.write_json_atomically(os.path.join(directory, pair_dataset.SUMMARY), summary)
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  lines = [f"{summary['name']} {summary['version']} in {summary['directory']}",
           f"  shards: {summary['shards']} ({summary['shards_resumed']} already done before "
           "this run)",
           f"  pairs written: {summary['written']:,} ({summary['num_bytes'] / 2**20:,.1f} MiB)",
           f"  pairs skipped: {summary['skipped_total']:,}"]
  lines += [f"    {k}: {v:,}" for k, v in summary["skipped"].items()]
  if summary["converted"]:
    lines.append("  converted on the way (pairs kept):")
    lines += [f"    {k}: {v:,}" for k, v in summary["converted"].items()]
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415
  f = flags.FLAGS
  options = Options(
      image=pair_cleaning.ImageOptions(max_side=f.max_side, min_side=f.min_side,
                                       max_pixels=f.max_pixels, quality=f.jpeg_quality),
      max_caption_chars=f.max_caption_chars, image_column=f.image_column,
      caption_column=f.caption_column,
      image_root=os.path.abspath(f.image_root) if f.image_root else "", delimiter=f.delimiter)
  tasks = plan_tasks(f.tar, f.csv, rows_per_shard=f.rows_per_shard, options=options)
  summary = convert(tasks, name=f.name, data_dir=f.data_dir, version=f.version, options=options,
                    workers=f.workers, progress=not f.quiet)
  print(format_summary(summary))
  print(f"\nNext: python -m xclip_jax.data.tokenizer --dataset={f.name} --data_dir={f.data_dir} "
        f"--text_key=caption --vocab_size=32000 "
        f"--output={os.path.join(f.data_dir, f.name, 'spm_32000.model')}")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("tar", "", "Webdataset/img2dataset tar shards: comma-separated paths, globs, "
                      "{000..099} ranges or directories.")
  flags.DEFINE_string("csv", "", "A CSV/TSV (with a header) of image path + caption.")
  flags.DEFINE_string("image_column", "image", "CSV column holding the image path.")
  flags.DEFINE_string("caption_column", "caption", "CSV column holding the caption.")
  flags.DEFINE_string("image_root", "", "Folder CSV image paths are relative to (default: the "
                      "CSV's folder).")
  flags.DEFINE_string("delimiter", "", "CSV delimiter ('' = tab for .tsv, else comma).")
  flags.DEFINE_integer("rows_per_shard", 10_000, "CSV rows per output shard.")
  flags.DEFINE_string("name", None, "Dataset name (lower_snake_case).", required=True)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir to write into.", required=True)
  flags.DEFINE_string("version", "1.0.0", "Dataset version (a new one for new inputs/options).")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Worker processes (0 = in this process).")
  flags.DEFINE_integer("max_side", 0, "Resize so the longer side is at most this (0 = keep).")
  flags.DEFINE_integer("min_side", pair_cleaning.ImageOptions.min_side,
                       "Skip images whose shorter side is below this.")
  flags.DEFINE_integer("max_pixels", pair_cleaning.ImageOptions.max_pixels,
                       "Skip images with more pixels (decompression bombs).")
  flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of re-encoded images.")
  flags.DEFINE_integer("max_caption_chars", 1000, "Cut longer captions (0 = never).")
  flags.DEFINE_bool("quiet", False, "No progress bar.")
  app.run(main)
