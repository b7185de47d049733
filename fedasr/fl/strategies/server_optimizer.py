"""The server's step on the aggregated update of the softmax family (wer-softmax, loss-softmax, fedavg).

The clients' weighted average ``a`` and the round's global model ``x`` give the pseudo-gradient ``d = a - x`` (an
ascent direction). The new global model is ``x + step(d)``:

- ``sgd``:      step = lr * d  (lr = 1: the published formula, x <- a; FedVSSL's server_lr otherwise)
- ``momentum``: m <- beta_1 * m + d;  step = lr * m  (FedAvgM, Hsu et al. 2019)
- ``adam``:     m <- beta_1 * m + (1 - beta_1) * d;  v <- beta_2 * v + (1 - beta_2) * d^2;
                step = lr * m / (sqrt(v) + tau)  (FedAdam, Reddi et al. 2021: no bias correction)
- ``yogi``:     as adam with v <- v - (1 - beta_2) * d^2 * sign(v - d^2)  (FedYogi)

Flower's FedAvgM/FedAdam/FedYogi weigh clients by their number of examples only; here the same server optimizers act
on whatever weights the strategy chose (the WER softmax). The moments persist from round to round and are part of
the server checkpoint (``state_dict``), so a resumed run continues with them. They are kept in float32 (one or two
model copies); each step is computed in float64.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedasr.fl.arrays import combine_floating

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi")


class ServerOptimizer:
    def __init__(self, name: str = "sgd", *, lr: float = 1.0, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-3) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer must be one of {SERVER_OPTIMIZERS}, got {name!r}")
        if lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {lr}")
        if not 0.0 <= beta_1 < 1.0 or not 0.0 <= beta_2 < 1.0:
            raise ValueError(f"server_beta_1 and server_beta_2 must lie in [0, 1), got {beta_1} and {beta_2}")
        if tau <= 0:
            raise ValueError(f"server_tau must be > 0, got {tau}")
        self.name, self.lr, self.beta_1, self.beta_2, self.tau = name, float(lr), float(beta_1), float(beta_2), float(tau)
        self.first_moment: dict[str, np.ndarray] = {}
        self.second_moment: dict[str, np.ndarray] = {}

    @property
    def is_identity(self) -> bool:
        """True when the step is x <- a (plain sgd at lr 1): no arithmetic, no state."""
        return self.name == "sgd" and self.lr == 1.0

    def step(self, current: Mapping[str, np.ndarray], averaged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global arrays from the round's ``current`` ones and the clients' ``averaged`` arrays (consumed
        key by key: no second full copy of the model). Arrays that are not floating point (counters) take the
        average as it is."""
        if self.is_identity:
            return averaged
        return combine_floating(current, averaged, lambda key, x, a: x + self._step_of(key, a - x))

    def _step_of(self, key: str, delta: np.ndarray) -> np.ndarray:
        if self.name == "sgd":
            return self.lr * delta
        m = self.first_moment.get(key)
        m = np.zeros_like(delta) if m is None else m.astype(np.float64)
        if self.name == "momentum":
            m = self.beta_1 * m + delta
            self.first_moment[key] = m.astype(np.float32)
            return self.lr * m
        m = self.beta_1 * m + (1.0 - self.beta_1) * delta
        v = self.second_moment.get(key)
        v = np.zeros_like(delta) if v is None else v.astype(np.float64)
        squared = delta * delta
        if self.name == "adam":
            v = self.beta_2 * v + (1.0 - self.beta_2) * squared
        else:  # yogi
            v = v - (1.0 - self.beta_2) * squared * np.sign(v - squared)
        self.first_moment[key], self.second_moment[key] = m.astype(np.float32), v.astype(np.float32)
        return self.lr * m / (np.sqrt(v) + self.tau)

    def state_dict(self) -> dict:
        return {"name": self.name, "first_moment": dict(self.first_moment), "second_moment": dict(self.second_moment)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the checkpoint's server optimizer is {state.get('name')!r}, this run's is {self.name!r}")
        self.first_moment = dict(state["first_moment"])
        self.second_moment = dict(state["second_moment"])
