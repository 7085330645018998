"""SentencePiece tokenizer: training from captions, fixed-length encoding, where the model lives,
and `resolve_tokenizer`, which picks it or OpenAI's BPE (clip_bpe.py) as the config says. Both are
data/text_spec.Tokenizer: `tokenizer.spec` is the TextSpec the model and objectives read.

Reserved ids (fixed for every model this module trains; the text tower and objectives rely on them):
  0  <pad>   padding after end-of-text
  1  <unk>   unknown piece
  2  </s>    end-of-text (eos); always present in an encoded row, CLIP pools the text feature here
  3  <mask>  control symbol for DeCLIP's masked language modelling; never produced by encode()
There is no BOS. Text is NFKC-normalised and lower-cased (`nmt_nfkc_cf`).

CLI (trains from a prepared TFDS dataset's captions):
  python -m xclip_jax.data.tokenizer --dataset=xclip_demo [--data_dir=DIR] [--split=train] \
      [--text_key=captions/text] [--vocab_size=1024] [--max_captions=N] --output=PATH

TensorFlow / TFDS are imported only inside the functions that read a dataset, so that encoding
with an existing model works on machines without TensorFlow.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from xclip_jax.data.text_spec import EOS_ID, MASK_ID, PAD_ID, UNK_ID, TextSpec

MASK_PIECE = "<mask>"


def train_tokenizer(captions: Iterable[str], vocab_size: int, output_path: str | None = None,
                    *, num_threads: int | None = None) -> bytes:
  """Trains a unigram SentencePiece model on `captions`; writes it to `output_path` atomically.

  `hard_vocab_limit=False` lets a small corpus produce fewer pieces than `vocab_size` (the
  resulting `Tokenizer.vocab_size` is then smaller, never larger). Returns the serialised model.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(captions), model_writer=model, model_type="unigram",
      vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
      pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, control_symbols=[MASK_PIECE],
      normalization_rule_name="nmt_nfkc_cf", input_sentence_size=10_000_000,
      shuffle_input_sentence=True, num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
  proto = model.getvalue()
  if output_path:
    _write_atomically(output_path, proto)
  return proto


def _write_atomically(path: str, data: bytes) -> None:
  """Temp file + rename in the same directory: readers never see a half-written model."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".spm_tmp_")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class Tokenizer:
  """A SentencePiece model with CLIP-style fixed-length encoding (ids + eos, zero padding)."""

  def __init__(self, path: str | None = None, *, model_proto: bytes | None = None):
    if (path is None) == (model_proto is None):
      raise ValueError("Give exactly one of `path` or `model_proto`.")
    if path is not None:
      with open(path, "rb") as f:
        model_proto = f.read()
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    # Fail loudly on a model trained with other reserved ids: the model code hard-relies on them.
    got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.piece_to_id(MASK_PIECE), self._sp.bos_id())
    if got != (PAD_ID, EOS_ID, MASK_ID, -1):
      raise ValueError(f"SentencePiece model {path or '<proto>'} has (pad, eos, mask, bos) ids "
                       f"{got}; expected {(PAD_ID, EOS_ID, MASK_ID, -1)}. Retrain it with "
                       "xclip_jax.data.tokenizer.train_tokenizer.")

  @property
  def vocab_size(self) -> int:
    """Number of pieces (ids are < this); may be below the size asked for at training time."""
    return self._sp.get_piece_size()

  pad_id, unk_id, eos_id, mask_id = PAD_ID, UNK_ID, EOS_ID, MASK_ID

  @property
  def spec(self) -> TextSpec:
    """The reserved ids above; vocab_size is this model's piece count."""
    return TextSpec.reserved(self.vocab_size)

  def encode(self, texts: Sequence[str], context_length: int, *, return_truncated: bool = False
             ) -> np.ndarray | tuple[np.ndarray, int]:
    """int32 [N, context_length]: pieces, then eos, then 0s; long texts are cut so eos survives.

    return_truncated=True also returns how many texts were cut.
    """
    if context_length < 1:
      raise ValueError(f"context_length must be >= 1, got {context_length}.")
    rows = self._sp.encode(list(texts), out_type=int)
    out = np.zeros((len(rows), context_length), np.int32)
    truncated = 0
    for i, ids in enumerate(rows):
      truncated += len(ids) > context_length - 1
      ids = ids[:context_length - 1]
      out[i, :len(ids)] = ids
      out[i, len(ids)] = EOS_ID
    return (out, truncated) if return_truncated else out

  def decode(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
    """Texts of encoded rows: each row is read up to its first eos; pad and mask ids are dropped."""
    texts = []
    for row in np.asarray(ids).reshape(-1, np.shape(ids)[-1]).tolist():
      if EOS_ID in row:
        row = row[:row.index(EOS_ID)]
      texts.append(self._sp.decode([i for i in row if i not in (PAD_ID, MASK_ID)]))
    return texts


# ---- dataset side (TFDS imported lazily) ----------------------------------------------------------

def dataset_captions(dataset: str, *, data_dir: str | None = None, split: str = "train",
                     text_key: str = "captions/text", max_captions: int = 0) -> Iterable[str]:
  """Yields the caption strings of a prepared TFDS dataset (every caption of list-valued fields)."""
  import tensorflow_datasets as tfds   # noqa: PLC0415 (lazy: keep TF off non-data machines)
  from xclip_jax.data import datasets  # noqa: PLC0415 (registers embedded builders; TF off GPUs)

  builder = datasets.prepare_dataset(dataset, data_dir or "")
  # Decode only the text feature: images are never read from disk into tensors.
  spec: dict = True  # type: ignore[assignment]
  for part in reversed(text_key.split("/")):
    spec = {part: spec}
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders=tfds.decode.PartialDecoding(spec))
  count = 0
  for example in ds.as_numpy_iterator():
    value = datasets.get_numpy_field(example, text_key)
    for text in np.atleast_1d(value).tolist():
      yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
      count += 1
      if max_captions and count >= max_captions:
        return


def default_tokenizer_path(config) -> str:
  """<tfds data_dir>/<dataset name>/spm_<vocab_size>.model (the dataset name without config/version)."""
  data_dir = config.data.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  name = config.data.name.split(":")[0].split("/")[0]
  return os.path.join(os.path.expanduser(data_dir), name, f"spm_{config.model.text.vocab_size}.model")


def build_command(config, path: str) -> str:
  """The exact CLI that builds the tokenizer `resolve_tokenizer` is looking for."""
  cmd = (f"python -m xclip_jax.data.tokenizer --dataset={config.data.name} "
         f"--split={config.data.split} --text_key={config.data.text_key} "
         f"--vocab_size={config.model.text.vocab_size} --output={path}")
  if config.data.data_dir:
    cmd += f" --data_dir={config.data.data_dir}"
  return cmd


def _clip_bpe(config):
  from xclip_jax.data import clip_bpe  # noqa: PLC0415 (regex/ftfy only when asked for)
  path = os.path.expanduser(config.tokenizer.path)
  if not path or not os.path.exists(path):
    raise FileNotFoundError(
        f"config.tokenizer.kind='clip_bpe' needs config.tokenizer.path to name OpenAI's merges "
        f"file (got {path!r}). bpe_simple_vocab_16e6.txt.gz ships in the open_clip_torch wheel "
        "(open_clip/bpe_simple_vocab_16e6.txt.gz); unzip it from there.")
  return clip_bpe.ClipBpeTokenizer(path)


def resolve_tokenizer(config, *, process_index: int | None = None,
                      wait_timeout_s: float = 600.0):
  """The tokenizer named by `config.tokenizer.path` (or the per-dataset default path).

  If the model file is missing and `config.tokenizer.train_if_missing`, process 0 trains it from
  the dataset's train-split captions and writes it (atomically); other processes wait for the file,
  which therefore must live on a filesystem every process sees. Otherwise raises FileNotFoundError
  with the command that builds it.

  config.tokenizer.kind = "clip_bpe" selects OpenAI CLIP's byte-level BPE instead (models imported
  with xclip_jax.interop.convert); config.tokenizer.path is then its merges file.
  """
  kind = config.tokenizer.get("kind", "sentencepiece")
  if kind == "clip_bpe":
    return _clip_bpe(config)
  if kind != "sentencepiece":
    raise ValueError(f"config.tokenizer.kind={kind!r}: use sentencepiece or clip_bpe.")
  path = os.path.expanduser(config.tokenizer.path or default_tokenizer_path(config))
  if os.path.exists(path):
    return Tokenizer(path)
  if not config.tokenizer.train_if_missing:
    raise FileNotFoundError(
        f"No SentencePiece model at {path}. Build it from the dataset's captions with:\n  "
        f"{build_command(config, path)}\nor point --config.tokenizer.path at an existing model "
        "(or set --config.tokenizer.train_if_missing=True).")
  if process_index is None:
    import jax  # noqa: PLC0415
    process_index = jax.process_index()
  if process_index == 0:
    captions = dataset_captions(config.data.name, data_dir=config.data.data_dir or None,
                                split=config.data.split,
                                text_key=config.data.text_key)
    train_tokenizer(captions, config.model.text.vocab_size, path)
    return Tokenizer(path)
  deadline = time.monotonic() + wait_timeout_s
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(
          f"Process {process_index} waited {wait_timeout_s:.0f}s for process 0 to write {path}. "
          "The data_dir must be shared by all processes, or build the model beforehand with:\n  "
          f"{build_command(config, path)}")
    time.sleep(1.0)
  return Tokenizer(path)


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415
  f = flags.FLAGS
  captions = dataset_captions(f.dataset, data_dir=f.data_dir or None, split=f.split,
                              text_key=f.text_key, max_captions=f.max_captions)
  train_tokenizer(captions, f.vocab_size, f.output)
  tok = Tokenizer(f.output)
  print(f"Wrote {f.output}: {tok.vocab_size} pieces (asked for {f.vocab_size}); "
        f"pad={tok.pad_id} eos={tok.eos_id} mask={tok.mask_id}")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("dataset", None, "TFDS dataset name (name[/config][:version]).", required=True)
  flags.DEFINE_string("data_dir", "", "TFDS data_dir ('' = TFDS default).")
  flags.DEFINE_string("split", "train", "Split whose captions train the model.")
  flags.DEFINE_string("text_key", "captions/text", "Caption feature path; '/' walks nested features.")
  flags.DEFINE_integer("vocab_size", 1024, "Target vocabulary size (an upper bound on tiny corpora).")
  flags.DEFINE_integer("max_captions", 0, "Read at most this many captions (0 = all).")
  flags.DEFINE_string("output", None, "Where to write the .model file.", required=True)
  app.run(main)
