"""Metric-softmax aggregation (Gao et al., ICASSP 2022), with the FedAvg mix and server learning rate of FedVSSL.

Client k gets the weight

    w_k = mix * softmax(s / T)_k + (1 - mix) * n_k / sum(n)

with s_k = 1 - wer_k ("wer-softmax") or s_k = -loss_k ("loss-softmax"), n_k its number of examples. The new
global model is  x <- x + step(sum_k w_k x_k - x)  with the server optimizer's step (fedasr/fl/strategies/
server_optimizer.py): sgd, lr * d by default; momentum, adam or yogi keep moments across rounds. mix = 1 with
sgd at server_lr = 1 is the published formula; mix = 0 is FedAvg. The softmax is computed in float64 and shifted by its maximum, so T = 0.01 with WER near 0
cannot overflow.

Where wer_k comes from is a setting: the client's own validation slice (reported in its reply, measured in
parallel by the clients, but on different data per client), or ``score_fn`` run on the server for every returned
model on one fixed server-held subset (the reference's behaviour: comparable numbers, at the cost of K
sequential decodes on the server per round).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord, weighted_average
from fedasr.fl.protocol import LOCAL_WER, NUM_EXAMPLES, REPORT_WER, TRAIN_LOSS
from fedasr.fl.strategies.base import Dropped, RoundOutcome, RoundStrategy
from fedasr.fl.strategies.server_optimizer import ServerOptimizer
from fedasr.fl.strategies.replies import (
    aggregate_train_metrics, array_spec, partition_of, reply_arrays, reply_metrics,
)

log = logging.getLogger(__name__)

SCORES = ("wer", "loss", "examples")


def softmax_weights(scores: np.ndarray | list[float], temperature: float) -> np.ndarray:
    """softmax(scores / temperature) in float64, shifted by the maximum (no overflow for any finite input)."""
    if temperature <= 0:
        raise ValueError(f"softmax temperature must be > 0, got {temperature}")
    logits = np.asarray(scores, dtype=np.float64) / float(temperature)
    if logits.size == 0 or not np.isfinite(logits).all():
        raise ValueError(f"softmax scores must be finite and non-empty, got {list(scores)}")
    exps = np.exp(logits - logits.max())
    return exps / exps.sum()


def example_weights(num_examples: np.ndarray | list[float]) -> np.ndarray:
    counts = np.asarray(num_examples, dtype=np.float64)
    return counts / counts.sum()


def mixed_weights(scores, num_examples, temperature: float, mix: float) -> np.ndarray:
    """mix * softmax(scores / T) + (1 - mix) * examples share; sums to 1."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], got {mix}")
    by_examples = example_weights(num_examples)
    if mix == 0.0:
        return by_examples
    return mix * softmax_weights(scores, temperature) + (1.0 - mix) * by_examples


def client_score(score: str, metrics: MetricRecord) -> float:
    """The quantity the softmax favours: 1 - WER, or minus the train loss."""
    if score == "wer":
        return 1.0 - float(metrics.get(LOCAL_WER, float("nan")))
    if score == "loss":
        return -float(metrics.get(TRAIN_LOSS, float("nan")))
    return 0.0


@dataclass
class ClientWeights:
    """The weights of one round's clients, before any array is averaged (a secure round sends them to SecAgg+)."""

    replies: list[Message]  # the replies that get a weight, in partition order
    weights: np.ndarray  # one per reply, summing to 1 (empty when no reply has a finite score)
    dropped: Dropped  # replies refused for a non-finite score

    @property
    def clients(self) -> list[int]:
        return [partition_of(m) for m in self.replies]

    def by_client(self) -> dict[int, float]:
        return dict(zip(self.clients, map(float, self.weights)))


class MetricSoftmax(RoundStrategy, FedAvg):
    """FedAvg whose client weights come from a softmax over a per-client metric (see module docstring).

    Parameters beyond FedAvg's: ``score`` in {"wer", "loss", "examples"}, ``temperature`` T, ``mix`` (share of
    the softmax against the FedAvg weights), the server optimizer (``server_optimizer`` sgd | momentum | adam | yogi,
    ``server_lr``, ``server_beta_1``, ``server_beta_2``, ``server_tau``), and ``score_fn`` (ArrayRecord -> WER
    fraction, evaluated on the server) for ``score="wer"`` measured server-side.
    """

    def __init__(
        self,
        *,
        score: str = "wer",
        temperature: float = 1.0,
        mix: float = 1.0,
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        server_beta_1: float = 0.9,
        server_beta_2: float = 0.99,
        server_tau: float = 1e-3,
        score_fn: Callable[[ArrayRecord], float] | None = None,
        **fedavg_kwargs,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must lie in [0, 1], got {mix}")
        self.server_optimizer = ServerOptimizer(server_optimizer, lr=server_lr, beta_1=server_beta_1,
                                                beta_2=server_beta_2, tau=server_tau)
        fedavg_kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**fedavg_kwargs)
        self.score = score
        self.temperature = float(temperature)
        self.mix = float(mix)
        self.score_fn = score_fn
        self.current_arrays: dict[str, np.ndarray] | None = None  # the round's global arrays (configure_train)

    @property
    def expected_arrays(self):
        return None if self.current_arrays is None else array_spec(self.current_arrays)

    @property
    def wants_client_wer(self) -> bool:
        """True when clients must measure WER on their own validation slice and report it."""
        return self.score == "wer" and self.score_fn is None and self.mix > 0

    def summary(self) -> None:
        log.info(
            "MetricSoftmax: score=%s T=%g mix=%g server optimizer %s at lr %g, wer measured on %s",
            self.score, self.temperature, self.mix, self.server_optimizer.name, self.server_optimizer.lr,
            "the server subset" if self.score_fn else "client slices",
        )
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays_to_numpy(arrays)
        config[REPORT_WER] = self.wants_client_wer
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_round(self, server_round: int, replies: Sequence[Message], *, refused: Dropped = ()) -> RoundOutcome:
        weighed = self.weigh_clients(replies)
        dropped = list(refused) + weighed.dropped
        if not weighed.replies:
            log.warning("round %d: no usable reply, the global model is kept", server_round)
            return RoundOutcome(dropped=dropped)
        # Streamed: each reply's arrays are converted one at a time inside the sum (memory O(model), not O(K x model)).
        averaged = weighted_average((reply_arrays(m) for m in weighed.replies), weighed.weights)
        return RoundOutcome(
            arrays=numpy_to_arrayrecord(self.apply_server_step(averaged)),
            metrics=self.round_metrics(weighed.replies, weighed.weights, dropped=len(dropped)),
            clients=weighed.clients, weights=weighed.by_client(), dropped=dropped,
        )

    def weigh_clients(self, replies: Sequence[Message]) -> ClientWeights:
        """The weights of the usable ``replies`` (metrics suffice: a secure round's replies hold no arrays)."""
        scores = [self._score(m) for m in replies]
        finite = [i for i, s in enumerate(scores) if np.isfinite(s)]
        dropped = [(partition_of(replies[i]), f"{self.score} score is not finite")
                   for i in sorted(set(range(len(replies))) - set(finite))]
        kept = [replies[i] for i in finite]
        if not kept:
            return ClientWeights([], np.zeros(0), dropped)
        examples = [float(reply_metrics(m)[NUM_EXAMPLES]) for m in kept]
        weights = mixed_weights([scores[i] for i in finite], examples, self.temperature, self.mix)
        return ClientWeights(kept, weights, dropped)

    def round_metrics(self, kept: list[Message], weights: np.ndarray, *, dropped: int) -> MetricRecord:
        """Aggregated training metrics, the largest weight and the number of ``dropped`` replies."""
        metrics = self.train_metrics_aggr_fn([m.content for m in kept], self.weighted_by_key)
        metrics["max-weight"] = float(weights.max())
        metrics["dropped-clients"] = dropped
        return metrics

    def state_dict(self) -> dict:
        """The server optimizer's moments (none for sgd: the state is empty, as before the setting existed)."""
        return {} if self.server_optimizer.name == "sgd" else {"server_optimizer": self.server_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """The server optimizer's moments; ``current_arrays``, which older checkpoints hold, is set again by every
        round."""
        state = {k: v for k, v in state.items() if k != "current_arrays"}
        if "server_optimizer" in state:
            self.server_optimizer.load_state_dict(state.pop("server_optimizer"))
        elif self.server_optimizer.name != "sgd":
            raise ValueError(f"the checkpoint holds no moments for server optimizer {self.server_optimizer.name!r}")
        super().load_state_dict(state)

    def _score(self, message: Message) -> float:
        if self.score == "wer" and self.score_fn is not None and self.mix > 0:
            return 1.0 - float(self.score_fn(reply_arrays(message)))
        if self.mix == 0:
            return 0.0
        return client_score(self.score, reply_metrics(message))

    def apply_server_step(self, averaged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global arrays: the server optimizer's step from this round's global model towards ``averaged``."""
        if self.current_arrays is None:  # aggregate_train called without configure_train (tests)
            return averaged
        return self.server_optimizer.step(self.current_arrays, averaged)
