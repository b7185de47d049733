"""bf16 on CUDA without fp16 RNNs.

PyTorch's autocast runs cuDNN RNNs (torch.nn.LSTM / GRU / RNN over a whole sequence) in fp16 whatever dtype the
autocast asked for: its wrapper of ``_cudnn_rnn`` casts inputs and weights to half. SpeechBrain scales the
gradients only at ``precision: fp16``, so a bf16 run would train the CRDNN's BiLSTMs in fp16 with unscaled
gradients (small ones flush to zero, silently). :func:`keep_rnns_in_fp32` makes those modules run in fp32 with
autocast off in bf16 runs on CUDA; the convolutions, linear layers and the decoder's GRU cell (cells autocast to
the requested dtype) stay bf16. At fp32 and fp16 (scaled), and on the CPU (bf16 RNNs through oneDNN), nothing
changes.

The change is a class swap (``torch.nn.LSTM`` -> :class:`LSTMInFp32`, a subclass with the same parameters), so
state dicts, optimizers and checkpoints are untouched.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence


def _as_fp32(value):
    if value is None:
        return None
    if isinstance(value, tuple):  # an LSTM's (h, c)
        return tuple(_as_fp32(part) for part in value)
    return value.float()


class _ForwardInFp32:
    """Mixin: the RNN's forward with autocast off and fp32 inputs (its weights are fp32 already)."""

    def forward(self, input, hx=None):  # noqa: A002 (torch's own argument name)
        data = input.data if isinstance(input, PackedSequence) else input
        with torch.autocast(device_type=data.device.type, enabled=False):
            return super().forward(input.float(), _as_fp32(hx))


class LSTMInFp32(_ForwardInFp32, torch.nn.LSTM):
    pass


class GRUInFp32(_ForwardInFp32, torch.nn.GRU):
    pass


class RNNInFp32(_ForwardInFp32, torch.nn.RNN):
    pass


_IN_FP32 = {torch.nn.LSTM: LSTMInFp32, torch.nn.GRU: GRUInFp32, torch.nn.RNN: RNNInFp32}


def rnns_run_in_fp32(model: torch.nn.Module) -> int:
    """Every torch.nn.LSTM / GRU / RNN of ``model`` runs in fp32 with autocast off from now on; returns how many
    were changed (subclasses of them other than these are left alone)."""
    changed = 0
    for module in model.modules():
        target = _IN_FP32.get(type(module))
        if target is not None:
            module.__class__ = target
            changed += 1
    return changed


def keep_rnns_in_fp32(model: torch.nn.Module, device: str, precision: str) -> int:
    """In a bf16 run on CUDA, :func:`rnns_run_in_fp32` (see the module's docstring); elsewhere nothing. Returns
    how many RNN modules were changed."""
    if precision == "bf16" and str(device).startswith("cuda"):
        return rnns_run_in_fp32(model)
    return 0
