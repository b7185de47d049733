"""Server-side, validation-driven annealing of the client learning rate (NewBob, from SpeechBrain).

After each round the global model's dev WER goes in; when the relative improvement over the previous round is
below ``threshold`` (after ``patience`` such rounds) the client lr is multiplied by ``factor``. The lr travels to
the clients in the next round's config.
"""

from __future__ import annotations

from speechbrain.nnet.schedulers import NewBobScheduler


class ClientLRAnnealer:
    """A thin wrapper over :class:`speechbrain.nnet.schedulers.NewBobScheduler` with a JSON-able state."""

    def __init__(self, initial_lr: float, *, factor: float = 0.8, threshold: float = 0.0025, patience: int = 0,
                 enabled: bool = True) -> None:
        if initial_lr <= 0 or not 0 < factor <= 1 or patience < 0:
            raise ValueError(
                f"annealing needs lr > 0, 0 < factor <= 1, patience >= 0; got lr={initial_lr}, factor={factor}, "
                f"patience={patience}"
            )
        self.enabled = enabled
        self._newbob = NewBobScheduler(
            initial_value=initial_lr, annealing_factor=factor, improvement_threshold=threshold, patient=patience
        )

    @property
    def lr(self) -> float:
        """The client lr for the next round."""
        return float(self._newbob.hyperparam_value)

    def step(self, dev_wer: float) -> tuple[float, float]:
        """Record this round's dev WER; returns (lr used this round, lr for the next round)."""
        if not self.enabled:
            return self.lr, self.lr
        old, new = self._newbob(float(dev_wer))
        return float(old), float(new)

    def state_dict(self) -> dict:
        return {
            "lr": self.lr,
            "metric_values": [float(v) for v in self._newbob.metric_values],
            "current_patient": int(self._newbob.current_patient),
        }

    def load_state_dict(self, state: dict) -> None:
        self._newbob.hyperparam_value = float(state["lr"])
        self._newbob.metric_values = [float(v) for v in state["metric_values"]]
        self._newbob.current_patient = int(state["current_patient"])
