"""Global feature normalisation whose statistics live in ``state_dict()`` and can be frozen.

SpeechBrain 1.1.2's ``InputNormalization`` keeps its running mean/std as plain attributes: they are saved by its
own Checkpointer hook but are absent from ``state_dict()``, so a model rebuilt from a state dict (server, client,
evaluation) would normalise with empty statistics. This subclass stores them as buffers (``glob_mean``,
``glob_std``, ``num_frames``) so they travel with every state dict, and adds ``frozen``: once set, the statistics
are never updated again, whatever the epoch or training mode.
"""

from __future__ import annotations

import torch
from speechbrain.processing.features import InputNormalization


class FrozenableInputNormalization(InputNormalization):
    """``InputNormalization`` (norm_type="global") with its statistics as buffers and a freeze switch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The parent stored plain tensors; turn them into buffers so state_dict() carries them.
        mean, std = self.__dict__.pop("glob_mean"), self.__dict__.pop("glob_std")
        self.register_buffer("glob_mean", mean)
        self.register_buffer("glob_std", std)
        self.frozen = False

    # The parent reads and writes ``self.count`` as a Python int; keep it in an integer buffer instead.
    @property
    def count(self) -> int:
        return int(self._buffers["num_frames"]) if "num_frames" in self._buffers else 0

    @count.setter
    def count(self, value) -> None:
        value = torch.as_tensor(int(value), dtype=torch.long)
        if "num_frames" in self._buffers:
            self._buffers["num_frames"] = value
        else:
            self.register_buffer("num_frames", value)

    @property
    def has_statistics(self) -> bool:
        return self.glob_mean.numel() > 0

    def freeze(self) -> None:
        """Stop all further updates of the statistics (call after the warm-up that computed them)."""
        self.frozen = True

    def forward(self, x, lengths=None, epoch=None):
        if not self.has_statistics and not self._should_update(epoch):
            return x  # nothing computed yet (an untrained model in eval mode): identity
        return super().forward(x, lengths, epoch=epoch)

    def _should_update(self, epoch):
        return not self.frozen and super()._should_update(epoch)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Buffers start empty (their size is known only after the first batch): adopt the stored shapes, on the
        # device the module is on (a CPU checkpoint loaded into a model already on a GPU stays on the GPU).
        for name in ("glob_mean", "glob_std"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=getattr(self, name).device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def to(self, *args, **kwargs):  # the parent's to() reassigns plain attributes; buffers move by themselves
        return torch.nn.Module.to(self, *args, **kwargs)
