"""The one global SentencePiece tokenizer: trained once on the warm-up (or centralized) training text, saved
with the checkpoint, loaded by every later stage (no stage trains its own).

Special ids are fixed so that CTC blank, BOS and EOS are distinct (joint CTC/attention beam search needs it):
0 = ``<blank>`` (CTC blank, SentencePiece's pad), 1 = ``<unk>``, 2 = ``<s>`` (BOS), 3 = ``</s>`` (EOS).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from fedasr.utils.io import atomic_open

BLANK_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILENAME = "tokenizer.model"


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or loaded; the message says why and what to do."""


def train_tokenizer(
    sentences: Iterable[str],
    model_path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
) -> "Tokenizer":
    """Train a SentencePiece model on ``sentences`` and write it atomically to ``model_path``.

    ``hard_vocab_limit=False`` lets a small corpus end with fewer pieces than ``vocab_size`` instead of failing;
    the real size is ``Tokenizer.vocab_size``.
    """
    sentences = [s.strip() for s in sentences if s and s.strip()]
    if not sentences:
        raise TokenizerError(f"no training text for the tokenizer {model_path}: the training manifest has no transcripts.")
    if vocab_size < 8:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: use at least 8 (4 are special ids).")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        hard_vocab_limit=False,
        pad_id=BLANK_ID,
        pad_piece="<blank>",
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=1,
        minloglevel=2,
    )
    with atomic_open(model_path, "wb") as handle:
        handle.write(buffer.getvalue())
    return Tokenizer(model_path)


class Tokenizer:
    """Words <-> token ids with a SentencePiece model file."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = Path(model_path)
        if not self.model_path.exists():
            raise TokenizerError(
                f"{self.model_path}: tokenizer model not found. It is written by `fedasr train-central` into the "
                "checkpoint folder; pass a complete checkpoint folder."
            )
        self.processor = spm.SentencePieceProcessor(model_file=str(self.model_path))
        ids = (self.processor.pad_id(), self.processor.unk_id(), self.processor.bos_id(), self.processor.eos_id())
        if ids != (BLANK_ID, UNK_ID, BOS_ID, EOS_ID):
            raise TokenizerError(
                f"{self.model_path}: special ids (blank, unk, bos, eos) are {ids}, expected "
                f"{(BLANK_ID, UNK_ID, BOS_ID, EOS_ID)}. Train it with fedasr.models.tokenizer.train_tokenizer."
            )

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def pieces(self) -> list[str]:
        return [self.processor.id_to_piece(i) for i in range(self.vocab_size)]

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> words; special ids and ids beyond the vocabulary (unused output units) are dropped."""
        keep = [int(i) for i in ids if UNK_ID < int(i) < self.vocab_size and int(i) not in (BOS_ID, EOS_ID)]
        return " ".join(self.processor.decode(keep).split())
