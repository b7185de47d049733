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
