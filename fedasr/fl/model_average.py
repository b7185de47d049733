"""The model a federated run evaluates and hands back: the global model itself, or an exponential moving average of
the global models of the rounds so far (``evaluation.ema_decay``, Polyak averaging on the server).

With decay d > 0, after every round that aggregated:  avg <- d * avg + (1 - d) * x  (avg starts at the seed). The
dev WER of each round, the NewBob annealing it drives, best_model.pt, final_model.pt and the test WERs are those of
``avg``; the clients still train from the global model x, so the averaging changes what is measured and kept, not
the training. It smooths the round-to-round noise of a sampled cross-device run (each round follows other speakers):
bench/RESULTS.md "Session 10". Arrays that are not floating point (counters) take the global model's values.
The decay's range is checked with the other settings (fedasr/fl/config.py).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from fedasr.fl.arrays import arrays_to_numpy, combine_floating, numpy_to_arrayrecord


class GlobalModelAverage:
    def __init__(self, decay: float, start: ArrayRecord, state: dict[str, np.ndarray] | None = None) -> None:
        self.decay = float(decay)
        self.current = numpy_to_arrayrecord(state) if state else start  # the model evaluated and handed back
        self._average = (dict(state) if state else arrays_to_numpy(start)) if self.decay > 0 else {}

    def update(self, global_arrays: ArrayRecord) -> ArrayRecord:
        """Fold in a round's new global model; returns the model to evaluate (the global model itself at decay 0)."""
        if self.decay == 0.0:
            self.current = global_arrays
            return global_arrays
        d = self.decay
        self._average = combine_floating(self._average, arrays_to_numpy(global_arrays),
                                         lambda _key, avg, x: d * avg + (1.0 - d) * x)
        self.current = numpy_to_arrayrecord(self._average)
        return self.current

    def state_dict(self) -> dict[str, np.ndarray]:
        """What a resume needs: the average's arrays (none at decay 0: it is then the global model)."""
        return dict(self._average)
