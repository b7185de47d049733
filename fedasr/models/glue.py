"""Small adapters that let any SpeechBrain (or torch) module play a role of fedasr.models.model.

Role interface of the encoder: ``encoder(feats [B, T, F], rel_lengths [B]) -> states [B, T', D]``. Modules with
another call signature are wrapped by :class:`Encoder` in the model YAML, e.g.::

    encoder: !new:fedasr.models.glue.Encoder
        body: !ref <crdnn>                  # CRDNN(feats) -> states
    encoder: !new:fedasr.models.glue.Encoder
        frontend: !ref <cnn_frontend>       # ConvolutionFrontEnd(feats) -> [B, T', C1, C2]
        body: !ref <transformer>
        method: encode                      # TransformerASR.encode(src, wav_len)
        pass_lengths: True
"""

from __future__ import annotations

import torch


class Encoder(torch.nn.Module):
    """``[frontend ->] body.<method>(x[, rel_lengths])`` with the encoder role's signature."""

    def __init__(self, body: torch.nn.Module, frontend: torch.nn.Module | None = None, method: str = "forward",
                 pass_lengths: bool = False):
        super().__init__()
        if not callable(getattr(body, method, None)):
            raise ValueError(f"encoder body {type(body).__name__} has no method '{method}'; set `method:` in the model YAML.")
        self.frontend = frontend
        self.body = body
        self.method = method
        self.pass_lengths = pass_lengths

    def forward(self, feats: torch.Tensor, rel_lengths: torch.Tensor) -> torch.Tensor:
        x = self.frontend(feats) if self.frontend is not None else feats
        call = getattr(self.body, self.method)
        out = call(x, rel_lengths) if self.pass_lengths else call(x)
        if isinstance(out, tuple):  # e.g. RNNs returning (output, hidden)
            out = out[0]
        if out.dim() == 4:  # [B, T, C1, C2] -> [B, T, C1 * C2]
            out = out.reshape(out.shape[0], out.shape[1], -1)
        return out


def lstm_forget_gate_bias(module: torch.nn.Module, forget_bias: float = 2.0) -> torch.nn.Module:
    """Start every LSTM inside ``module`` with its forget gates open: forget-gate bias ``forget_bias``, the other
    gates' biases 0 (PyTorch draws them at random). Returns ``module``; used from a model YAML after the module::

        lstm_init: !apply:fedasr.models.glue.lstm_forget_gate_bias
            module: !ref <crdnn>

    PyTorch's LSTM adds two bias vectors (``bias_ih`` + ``bias_hh``, gates ordered input, forget, cell, output):
    each gets half of ``forget_bias``. Why: with PyTorch's default biases one tiny-CRDNN CTC model in seven never
    left the all-blank plateau (bench/RESULTS.md, "Session 12"); an open forget gate lets the gradient reach back
    through time from the first steps (Gers et al. 2000; Jozefowicz et al. 2015)."""
    lstms = [m for m in module.modules() if isinstance(m, torch.nn.LSTM)]
    if not lstms:
        raise ValueError(f"lstm_forget_gate_bias: {type(module).__name__} holds no torch.nn.LSTM; remove the line "
                         "from the model YAML or point it at the module that holds the LSTM.")
    with torch.no_grad():
        for lstm in lstms:
            for name, bias in lstm.named_parameters():
                if name.startswith("bias_"):
                    hidden = bias.shape[0] // 4
                    bias.zero_()
                    bias[hidden:2 * hidden] = forget_bias / 2
    return module


def zero_parameters(module: torch.nn.Module) -> torch.nn.Module:
    """Start ``module`` (an output layer) at zero: weights and biases. Returns ``module``; used from a model YAML::

        ctc_init: !apply:fedasr.models.glue.zero_parameters
            module: !ref <ctc_lin>

    A zero CTC head starts every output, blank included, equally likely whatever the input; its first steps then
    fit the encoder's initial (input-dependent) features to the transcripts before any gradient reaches the
    encoder. With PyTorch's random head, 4 of 10 tiny-CRDNN CTC warm-ups were still on the all-blank plateau after 4
    epochs (one for good); with a zero head none was (bench/RESULTS.md, "Session 12")."""
    params = list(module.parameters())
    if not params:
        raise ValueError(f"zero_parameters: {type(module).__name__} has no parameters; point it at the output layer.")
    with torch.no_grad():
        for param in params:
            param.zero_()
    return module
