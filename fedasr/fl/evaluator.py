"""The server-held model: the run's ASR system, loaded with global arrays to measure WER (dev each round, the
server-side client scores of wer-softmax, test)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from fedasr.fl.arrays import arrayrecord_to_state, state_to_arrayrecord
from fedasr.fl.config import import_system_class
from fedasr.utils.device import resolve_device


def load_system(run):
    """The run's ASRSystem (``run.config.system``) built from the seed checkpoint, with the run's overrides, on the
    run's device (``auto``: a GPU when this machine has one; one it cannot use is a DeviceError here, at once) and
    at its precision (decoding under autocast). Aggregation never touches it: the arrays stay on the CPU."""
    device = resolve_device(run.config.device, what="device (fl hparams: the server's)")
    precision = str(getattr(run.config, "precision", "fp32"))
    extra = {"precision": precision} if precision != "fp32" else {}  # systems without it keep working at fp32
    system_class = import_system_class(run.config.system)
    return system_class.from_checkpoint(run.seed_checkpoint, overrides=run.config.system_overrides or None,
                                        device=device, **extra)


class GlobalModelEvaluator:
    """Loads global arrays into the server's system and decodes a manifest with them (or, for server_training,
    fine-tunes them on one)."""

    def __init__(self, system) -> None:
        self.system = system
        self.template = {k: v.detach().clone() for k, v in system.state_dict().items()}

    def initial_arrays(self) -> ArrayRecord:
        return state_to_arrayrecord(self.template)

    def full_state(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        return arrayrecord_to_state(arrays, self.template)

    def evaluate(self, arrays: ArrayRecord, manifest: str, *, decoding: str, max_utterances: int | None):
        self.system.load_state_dict(self.full_state(arrays))
        return self.system.evaluate(manifest, decoding=decoding, max_utterances=max_utterances)

    def train(self, arrays: ArrayRecord, manifest: str, **fit_options) -> tuple[ArrayRecord, object]:
        """``arrays`` trained on ``manifest`` by the system's ``fit`` (epochs, lr, batch_size, seed, optimizer,
        momentum); returns (the new arrays, the FitResult)."""
        self.system.load_state_dict(self.full_state(arrays))
        result = self.system.fit(manifest, **fit_options)
        return state_to_arrayrecord(self.system.state_dict()), result
