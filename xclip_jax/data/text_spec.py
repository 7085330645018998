"""What every tokenizer is to the rest of the code: the `Tokenizer` protocol and the `TextSpec`
(vocabulary size and special ids) it carries.

The model needs the end-of-text id (the text tower pools there); objectives that edit token ids
need the rest (DeCLIP's MLM masks with `mask_id`, never touches pad/eos/mask, and draws random
replacements from [first_regular_id, vocab_size)). The tokenizers are data/tokenizer.py
(SentencePiece, ids reserved as below) and data/clip_bpe.py (OpenAI's BPE, its own ids); a source
without text to encode (data/synthetic.py) has a TextSpec and no tokenizer.

No TensorFlow, no SentencePiece: benchmarks and the synthetic source import this.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

# The ids every SentencePiece model of this project reserves (data/tokenizer.py trains them so).
PAD_ID, UNK_ID, EOS_ID, MASK_ID = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class TextSpec:
  vocab_size: int            # token ids are below this; MLM's random replacements too
  pad_id: int
  eos_id: int
  mask_id: int
  first_regular_id: int      # the first id that is an ordinary piece (MLM's lowest replacement)

  @classmethod
  def reserved(cls, vocab_size: int) -> TextSpec:
    """The SentencePiece layout: pad 0, unknown 1, end-of-text 2, mask 3, pieces from 4."""
    return cls(vocab_size=int(vocab_size), pad_id=PAD_ID, eos_id=EOS_ID, mask_id=MASK_ID,
               first_regular_id=MASK_ID + 1)

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Ids that masking never replaces: padding, end-of-text and the mask itself."""
    return (self.pad_id, self.eos_id, self.mask_id)


class Tokenizer(Protocol):
  """Fixed-length encoding of captions into the ids the text tower reads."""

  @property
  def spec(self) -> TextSpec:
    ...

  def encode(self, texts: Sequence[str], context_length: int, *,
             return_truncated: bool = False) -> np.ndarray | tuple[np.ndarray, int]:
    """int32 [N, context_length] rows that always hold end-of-text (long texts are cut before
    it); return_truncated=True also returns how many texts were cut."""
    ...

  def decode(self, ids) -> list[str]:
    """The texts of encoded rows, each read up to its end-of-text."""
    ...
