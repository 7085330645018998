"""OpenAI CLIP's byte-level BPE tokenizer, for models imported from OpenAI / open_clip checkpoints.

The vocabulary is built from a merges file such as `bpe_simple_vocab_16e6.txt.gz` (it ships inside
the open_clip_torch wheel, at open_clip/bpe_simple_vocab_16e6.txt.gz; nothing is downloaded here):
  ids 0..255      the 256 bytes, each mapped to a printable unicode character
  ids 256..511    the same characters with the end-of-word marker '</w>'
  then            one id per merge, in file order (line 1 is a header; at most 48,894 merges,
                  as OpenAI reads them: 49,152 - 256 - 2)
  last two        <start_of_text> and <end_of_text>
so the released vocabulary has 49,408 ids, <end_of_text> = 49407 being the largest: OpenAI's text
tower pools at argmax(ids), which is our tower's first `eos_id`.

Text is cleaned as OpenAI does (ftfy.fix_text, HTML unescaped twice, whitespace collapsed,
lower-cased), split by OpenAI's regular expression, and each word is byte-encoded and merged by
rank. Rows are <start_of_text> ids... <end_of_text> then zeros; a text too long for the context is
cut so that its last id is <end_of_text> (open_clip's behaviour; OpenAI's `truncate=True`).

Select it with config.tokenizer.kind = "clip_bpe" and config.tokenizer.path = the merges file.
"""

from __future__ import annotations

import functools
import gzip
import html
from typing import Sequence

import ftfy
import numpy as np
import regex

from xclip_jax.data import text_spec

MAX_MERGES = 49152 - 256 - 2
# open_clip's names for the two special tokens (OpenAI's: <|startoftext|>, <|endoftext|>).
START, END = "<start_of_text>", "<end_of_text>"
END_OF_WORD = "</w>"
# OpenAI's pre-tokenizer: the special tokens (written in a text, they are those tokens, as in
# open_clip), English contractions, runs of letters, single digits, runs of other non-space
# characters.
WORD_PATTERN = regex.compile(
    "|".join(regex.escape(t) for t in (START, END))
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to
  themselves, the other 68 bytes to chr(256 + n) in byte order."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  others = [b for b in range(256) if b not in set(printable)]
  # Insertion order is vocabulary order: printable bytes first, then the others.
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def read_merges(path: str) -> list[tuple[str, str]]:
  """The merge pairs of a (gzipped or plain) merges file: line 1 is a header, one pair per line."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = []
  for number, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{path}:{number}: expected two space-separated symbols, got {line!r}.")
    merges.append((parts[0], parts[1]))
    if len(merges) == MAX_MERGES:
      break
  return merges


def clean(text: str) -> str:
  """OpenAI's basic_clean + whitespace_clean, then lower case."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).lower()


class ClipBpeTokenizer:
  """A text_spec.Tokenizer, as tokenizer.Tokenizer (also vocab_size/pad_id/eos_id/mask_id)."""

  kind = "clip_bpe"

  def __init__(self, path: str):
    self.path = path
    merges = read_merges(path)
    chars = list(byte_to_unicode().values())
    vocab = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [START, END]
    self.encoder = {piece: i for i, piece in enumerate(vocab)}
    if len(self.encoder) != len(vocab):
      raise ValueError(f"{path}: merges produce duplicate vocabulary entries.")
    self.decoder = vocab
    self.ranks = {pair: rank for rank, pair in enumerate(merges)}
    self.byte_encoder = byte_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    self.sot_id, self.eos_id = self.encoder[START], self.encoder[END]
    self._cache: dict[str, tuple[str, ...]] = {START: (START,), END: (END,)}

  pad_id = 0           # OpenAI pads with 0 (also the id of '!'; rows are read up to eos)

  @property
  def vocab_size(self) -> int:
    return len(self.decoder)

  @property
  def mask_id(self) -> int:
    """OpenAI's vocabulary has no mask token; MLM (DeCLIP) masks with <start_of_text>, which
    otherwise only appears at position 0."""
    return self.sot_id

  @property
  def spec(self) -> text_spec.TextSpec:
    """Token facts for MLM: random replacements come from the merged pieces and bytes, never
    the two special tokens at the top of the vocabulary."""
    return text_spec.TextSpec(vocab_size=self.sot_id, pad_id=self.pad_id, eos_id=self.eos_id,
                              mask_id=self.mask_id, first_regular_id=1)

  def bpe(self, word: str) -> tuple[str, ...]:
    """The pieces of one byte-encoded word: merge the lowest-ranked adjacent pair until none is
    in the merge table."""
    if word in self._cache:
      return self._cache[word]
    parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(parts) > 1:
      pairs = {(a, b) for a, b in zip(parts, parts[1:])}
      best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    result = tuple(parts)
    if len(self._cache) < 1_000_000:
      self._cache[word] = result
    return result

  def encode_text(self, text: str) -> list[int]:
    """The BPE ids of one text, without <start_of_text> / <end_of_text>."""
    ids = []
    for word in WORD_PATTERN.findall(clean(text)):
      encoded = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
      ids.extend(self.encoder[piece] for piece in self.bpe(encoded))
    return ids

  def encode(self, texts: Sequence[str], context_length: int, *, return_truncated: bool = False
             ) -> np.ndarray | tuple[np.ndarray, int]:
    """int32 [N, context_length]: <start_of_text>, ids, <end_of_text>, then zeros.

    return_truncated=True also returns how many texts were cut.
    """
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}.")
    out = np.zeros((len(texts), context_length), np.int32)
    truncated = 0
    for i, text in enumerate(texts):
      ids = self.encode_text(text)
      truncated += len(ids) > context_length - 2
      ids = [self.sot_id] + ids[:context_length - 2] + [self.eos_id]
      out[i, :len(ids)] = ids
    return (out, truncated) if return_truncated else out

  def decode(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
    """Texts of encoded rows, each read up to its first <end_of_text>; words end in a space
    (OpenAI's decode), trailing space stripped."""
    texts = []
    for row in np.asarray(ids).reshape(-1, np.shape(ids)[-1]).tolist():
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      pieces = "".join(self.decoder[i] for i in row if i != self.sot_id)
      text = bytearray(self.byte_decoder[c] for c in pieces).decode("utf-8", errors="replace")
      texts.append(text.replace(END_OF_WORD, " ").strip())
    return texts
