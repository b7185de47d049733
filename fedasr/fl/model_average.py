"""The model a federated run evaluates and hands back: the global model itself, or an exponential moving average of
the global models of the rounds so far (``evaluation.ema_decay``, Polyak averaging on the server).

With decay d > 0, after every round that aggregated:  avg <- d * avg + (1 - d) * x  (avg starts at the seed). The
dev WER of each round, the NewBob annealing it drives, best_model.pt, final_model.pt and the test WERs are those of
``avg``; the clients still train from the global model x, so the averaging changes what is measured and kept, not
the training. It smooths the round-to-round noise of a sampled cross-device run (each round follows other speakers):
bench/RESULTS.md "Session 10". Arrays that are not floating point (counters) take the global model's values.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord


class GlobalModelAverage:
    def __init__(self, decay: float, start: ArrayRecord, state: dict[str, np.ndarray] | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"evaluation.ema_decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.current = numpy_to_arrayrecord(state) if state else start  # the model evaluated and handed back

    def update(self, global_arrays: ArrayRecord) -> ArrayRecord:
        """Fold in a round's new global model; returns the model to evaluate (the global model itself at decay 0)."""
        if self.decay == 0.0:
            self.current = global_arrays
            return global_arrays
        previous = arrays_to_numpy(self.current)
        averaged = {}
        for key, value in arrays_to_numpy(global_arrays).items():
            if np.issubdtype(value.dtype, np.floating):
                mixed = self.decay * previous[key].astype(np.float64) + (1.0 - self.decay) * value.astype(np.float64)
                averaged[key] = mixed.astype(value.dtype)
            else:
                averaged[key] = value
        self.current = numpy_to_arrayrecord(averaged)
        return self.current

    def state_dict(self) -> dict[str, np.ndarray]:
        """What a resume needs: the average's arrays (none at decay 0: it is then the global model)."""
        return arrays_to_numpy(self.current) if self.decay > 0 else {}
