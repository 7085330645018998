"""Readers of raw image-text pairs: webdataset / img2dataset tar shards and CSV/TSV caption files.

Each reader yields `RawPair`s and counts what it has to skip in a `collections.Counter`:
  unsafe_tar_entry   absolute path, '..' component, link, device or other non-regular tar member
                     (never read, never written anywhere)
  missing_image      a sample without an image member / a CSV row whose image file is missing
  missing_caption    a sample without .txt (or a .json "caption")
  oversized_entry    a member or file larger than `max_entry_bytes` (not read into memory)
  truncated_tar      the shard ends mid-member: pairs before the damage are kept, counted once
  bad_row            a CSV row without the image or caption column

Tar shards are read in memory with `tarfile` (streaming, never extracted to disk). Samples follow
the webdataset convention: members sharing a key (path up to the first '.' of the file name) are
consecutive and form one sample: `000123.jpg`, `000123.txt`, `000123.json`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import posixpath
import tarfile
import zlib
from typing import Iterator

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_ENTRY_BYTES = 64 * 2**20


@dataclasses.dataclass
class RawPair:
  key: str                      # where the pair came from: "<shard>/<sample key>" or "<csv>:<row>"
  image: bytes | None
  caption: bytes | str | None


def is_safe_member(member: tarfile.TarInfo) -> bool:
  """Regular file with a relative path that stays inside the archive (no '..', no leading '/')."""
  if not member.isreg():                 # links, devices, FIFOs, directories
    return False
  name = member.name.replace("\\", "/")
  if name.startswith("/") or (len(name) > 1 and name[1] == ":"):   # POSIX or Windows absolute
    return False
  return ".." not in name.split("/") and "\x00" not in name


def _split_key(name: str) -> tuple[str, str]:
  directory, base = posixpath.split(name)
  stem, _, extension = base.partition(".")
  return posixpath.join(directory, stem), extension.lower()


def _sample_to_pair(shard: str, key: str, members: dict[str, bytes],
                    counts: collections.Counter) -> RawPair | None:
  image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
  if image is None:
    counts["missing_image"] += 1
    return None
  caption = members.get("txt")
  if caption is None and "json" in members:   # img2dataset also stores the caption in the json
    try:
      value = json.loads(members["json"]).get("caption")
      caption = value if isinstance(value, str) else None
    except (ValueError, AttributeError):
      caption = None
  if caption is None:
    counts["missing_caption"] += 1
    return None
  return RawPair(f"{shard}/{key}", image, caption)


def read_tar_shard(path: str, counts: collections.Counter,
                   max_entry_bytes: int = MAX_ENTRY_BYTES) -> Iterator[RawPair]:
  """Pairs of one (optionally gzip/bz2/xz compressed) webdataset tar shard, in archive order."""
  shard = os.path.basename(path)
  key, members = None, {}
  try:
    with tarfile.open(path, mode="r|*") as archive:   # streaming: one pass, nothing extracted
      for member in archive:
        if member.isdir():
          continue
        if not is_safe_member(member):
          counts["unsafe_tar_entry"] += 1
          continue
        member_key, extension = _split_key(member.name)
        if member_key != key:
          if key is not None:
            pair = _sample_to_pair(shard, key, members, counts)
            if pair is not None:
              yield pair
          key, members = member_key, {}
        if member.size > max_entry_bytes:
          counts["oversized_entry"] += 1
          members.pop(extension, None)
          continue
        handle = archive.extractfile(member)   # a file object over the stream, not a disk write
        members[extension] = handle.read() if handle is not None else b""
  except (tarfile.TarError, EOFError, OSError, zlib.error):   # truncated or corrupt archive
    counts["truncated_tar"] += 1
    key = None     # the sample being read when the archive broke may be incomplete: dropped
  if key is not None:
    pair = _sample_to_pair(shard, key, members, counts)
    if pair is not None:
      yield pair


# ---- CSV / TSV -----------------------------------------------------------------------------------

def _dialect(path: str, delimiter: str) -> str:
  if delimiter:
    return {"tab": "\t", "\\t": "\t", "comma": ","}.get(delimiter, delimiter)
  return "\t" if path.lower().endswith((".tsv", ".tsv.txt")) else ","


def read_csv_header(path: str, delimiter: str = "") -> list[str]:
  with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
    return next(csv.reader(f, delimiter=_dialect(path, delimiter)), [])


def count_csv_rows(path: str, delimiter: str = "") -> int:
  """Data rows (records, not lines: quoted captions may span lines)."""
  with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
    return max(0, sum(1 for _ in csv.reader(f, delimiter=_dialect(path, delimiter))) - 1)


def read_csv_rows(path: str, start: int, stop: int, counts: collections.Counter, *,
                  image_column: str, caption_column: str, image_root: str = "",
                  delimiter: str = "", max_entry_bytes: int = MAX_ENTRY_BYTES
                  ) -> Iterator[RawPair]:
  """Pairs of data rows [start, stop) of a CSV/TSV with a header; image paths are relative to
  `image_root` (default: the CSV's folder) unless absolute. Captions keep undecodable bytes as
  surrogates (cleaning repairs and counts them)."""
  root = image_root or os.path.dirname(os.path.abspath(path))
  csv.field_size_limit(2**31 - 1)    # huge captions are truncated by cleaning, not a crash here
  with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
    rows = csv.DictReader(f, delimiter=_dialect(path, delimiter))
    for index, row in enumerate(rows):
      if index < start:
        continue
      if index >= stop:
        break
      image_path, caption = row.get(image_column), row.get(caption_column)
      if not image_path or caption is None:
        counts["bad_row"] += 1
        continue
      full = os.path.join(root, os.path.expanduser(image_path))
      try:
        if os.path.getsize(full) > max_entry_bytes:
          counts["oversized_entry"] += 1
          continue
        with open(full, "rb") as image_file:
          image = image_file.read()
      except OSError:   # missing, a directory, unreadable
        counts["missing_image"] += 1
        continue
      yield RawPair(f"{os.path.basename(path)}:{index}", image, caption)
