"""SentencePiece tokenizer: reserved ids, fixed-length encoding, decoding, missing-model errors."""

import ml_collections
import numpy as np
import pytest

from xclip_jax.data import text_spec
from xclip_jax.data import tokenizer as toklib
from xclip_jax.data.builders import xclip_demo


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  rng = np.random.default_rng(0)
  captions = [xclip_demo.make_caption("red", "circle", "small", "left", "plain", rng)
              for _ in range(200)]
  captions += ["a photo of a dog on the grass", "two cats sleeping on a sofa"] * 20
  path = str(tmp_path_factory.mktemp("spm") / "spm.model")
  toklib.train_tokenizer(captions, vocab_size=300, output_path=path, num_threads=1)
  return toklib.Tokenizer(path)


def test_reserved_ids(tokenizer):
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.eos_id, tokenizer.mask_id) == (0, 1, 2, 3)
  sp = tokenizer._sp  # the underlying model must agree with the documented constants
  assert sp.id_to_piece(3) == "<mask>" and sp.is_control(3)
  assert sp.pad_id() == 0 and sp.eos_id() == 2 and sp.bos_id() == -1
  assert 10 < tokenizer.vocab_size <= 300
  # The TextSpec the model and the objectives read: the same ids, pieces from 4 on.
  assert tokenizer.spec == text_spec.TextSpec(vocab_size=tokenizer.vocab_size, pad_id=0,
                                              eos_id=2, mask_id=3, first_regular_id=4)
  assert tokenizer.spec == text_spec.TextSpec.reserved(tokenizer.vocab_size)
  assert tokenizer.spec.special_ids == (0, 2, 3)


def test_encode_pads_and_always_ends_with_eos(tokenizer):
  texts = ["a red circle", "a crimson disk on the left " * 20, ""]
  ids = tokenizer.encode(texts, context_length=8)
  assert ids.dtype == np.int32 and ids.shape == (3, 8)
  for row in ids:
    eos = list(row).index(2)
    assert (row[eos + 1:] == 0).all()              # zero padding after eos
    assert (row[:eos] > 3).all()                    # no pad/unk/eos/mask inside the text
  assert ids[1, -1] == 2                            # truncated: eos kept at the last position
  assert ids[2, 0] == 2 and (ids[2, 1:] == 0).all()  # empty text is just eos


def test_decode_round_trip_lowercases(tokenizer):
  texts = ["A Red Circle on the left", "two cats sleeping"]
  assert tokenizer.decode(tokenizer.encode(texts, 32)) == [t.lower() for t in texts]
  # Decoding stops at eos and ignores the mask id (MLM inputs decode to the unmasked rest).
  row = tokenizer.encode(["a red circle"], 16)[0]
  row[1] = toklib.MASK_ID
  assert tokenizer.decode(row[None])[0].split()[0] == "a"


def test_in_memory_model_and_wrong_ids(tokenizer, tmp_path):
  proto = open(tokenizer.path, "rb").read()
  assert toklib.Tokenizer(model_proto=proto).encode(["red"], 4).tolist() == \
      tokenizer.encode(["red"], 4).tolist()
  import io
  import sentencepiece as spm
  buf = io.BytesIO()   # a model with SentencePiece's default ids (bos=1, eos=2, unk=0, no pad)
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["a red circle"] * 50), model_writer=buf,
                                 vocab_size=20, hard_vocab_limit=False, minloglevel=2)
  with pytest.raises(ValueError, match="expected"):
    toklib.Tokenizer(model_proto=buf.getvalue())


def _config(data_dir, **tokenizer):
  c = ml_collections.ConfigDict()
  c.data = dict(name="xclip_demo", data_dir=str(data_dir), split="train", text_key="captions/text")
  c.model = dict(text=dict(vocab_size=512))
  c.tokenizer = dict(path="", train_if_missing=False)
  c.tokenizer.update(tokenizer)
  return c


def test_missing_model_error_gives_the_command(tmp_path):
  c = _config(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    toklib.resolve_tokenizer(c, process_index=0)
  expected_path = str(tmp_path / "xclip_demo" / "spm_512.model")
  assert "python -m xclip_jax.data.tokenizer --dataset=xclip_demo" in str(e.value)
  assert f"--output={expected_path}" in str(e.value)


def test_resolve_uses_an_existing_path(tokenizer, tmp_path):
  c = _config(tmp_path, path=tokenizer.path)
  assert toklib.resolve_tokenizer(c, process_index=0).vocab_size == tokenizer.vocab_size


def test_non_zero_process_waits_then_times_out(tmp_path):
  c = _config(tmp_path, train_if_missing=True)
  with pytest.raises(TimeoutError, match="process 0"):
    toklib.resolve_tokenizer(c, process_index=1, wait_timeout_s=0.5)
