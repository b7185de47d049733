"""The contract between the acoustic-model layer (fedasr.models) and the federated layer (fedasr.fl).

The federated code never touches SpeechBrain directly: it loads a seed checkpoint into an ``ASRSystem`` and
calls the methods below. A fake implementation of this protocol is enough to unit-test the federated logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch


@dataclass
class FitResult:
    train_loss: float  # mean training loss over the local batches
    num_examples: int  # utterances seen per epoch (the FedAvg weight)
    seconds: float = 0.0  # wall time of the local training


@dataclass
class EvalResult:
    wer: float  # fraction: word errors / reference words (summed, never averaged over utterances)
    cer: float
    word_errors: int
    words: int
    char_errors: int = 0
    chars: int = 0
    num_utterances: int = 0
    loss: float = float("nan")
    per_utterance: list[dict] = field(default_factory=list)  # ID, spk_id, ref, hyp, errors, words (when asked)


class ASRSystem(Protocol):
    """A trained (or seed) recognizer: modules + frozen normaliser stats + the one global tokenizer."""

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, overrides: dict | None = None, device: str = "cpu") -> "ASRSystem":
        """Rebuild from an exported seed checkpoint (model + tokenizer + normaliser stats + resolved YAML)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that travels between server and clients, normaliser stats and BatchNorm buffers included."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load global weights; frozen normaliser stats are loaded as they are and never updated afterwards."""

    def fit(self, manifest: str | Path, *, epochs: int, lr: float, batch_size: int, seed: int,
            proximal_mu: float = 0.0, optimizer: str = "sgd", momentum: float = 0.0) -> FitResult:
        """Local fine-tuning for ``epochs`` epochs with a fresh optimizer ("sgd" with ``momentum``, or "adam");
        no checkpoint recovery, no beam search.
        ``proximal_mu`` > 0: FedProx's proximal term mu/2 * ||w - w_start||^2 is added to the loss."""

    def evaluate(
        self, manifest: str | Path, *, decoding: str = "greedy", max_utterances: int | None = None,
        per_utterance: bool = False,
    ) -> EvalResult:
        """WER/CER on a manifest with ``decoding`` in {"greedy", "beam"}."""
