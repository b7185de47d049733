"""Strategies by name, as chosen in hparams/fl/*.yaml (``strategy: {name: ..., <settings>}``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedProx, FedYogi, Strategy

from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord
from fedasr.fl.strategies.base import Dropped, RoundOutcome, RoundStrategy
from fedasr.fl.strategies.metric_softmax import MetricSoftmax
from fedasr.fl.strategies.replies import aggregate_train_metrics, array_spec, partition_of
from fedasr.utils.settings import did_you_mean

log = logging.getLogger(__name__)


class FlowerAggregation(RoundStrategy):
    """Put before one of Flower's strategy classes: its own aggregation, fedasr's round interface.

    ``state_attributes``: the Flower attributes that carry state between rounds (a server optimizer's moments and
    the arrays they refer to), saved and restored by state_dict / load_state_dict. The names are Flower's (its
    private implementation): they are listed here, per class, and nowhere else.
    """

    state_attributes: tuple[str, ...] = ()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
        self.expected_arrays = array_spec(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_round(self, server_round: int, replies: Sequence[Message], *, refused: Dropped = ()) -> RoundOutcome:
        if not replies:
            log.warning("round %d: no usable reply, the global model is kept", server_round)
            return RoundOutcome(dropped=list(refused))
        flower_aggregate = super(RoundStrategy, self).aggregate_train  # the Flower class this mixin precedes
        arrays, metrics = flower_aggregate(server_round, list(replies))
        clients = [partition_of(m) for m in replies] if arrays is not None else []
        return RoundOutcome(arrays=arrays, metrics=metrics, clients=clients, dropped=list(refused))

    def state_dict(self) -> dict:
        state = {}
        for name in self.state_attributes:
            value = getattr(self, name)
            if isinstance(value, ArrayRecord):
                state[name] = {"kind": "arrayrecord", "value": arrays_to_numpy(value)}
            else:
                state[name] = {"kind": "plain", "value": value}
        return state

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - set(self.state_attributes))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no state {unknown} (it keeps {list(self.state_attributes)})")
        for name, entry in state.items():
            value = entry["value"]
            setattr(self, name, numpy_to_arrayrecord(value) if entry["kind"] == "arrayrecord" else value)


class RobustFedAdam(FlowerAggregation, FedAdam):
    """Flower's FedAdam on vetted, ordered replies."""

    state_attributes = ("current_arrays", "m_t", "v_t")


class RobustFedYogi(FlowerAggregation, FedYogi):
    """Flower's FedYogi on vetted, ordered replies."""

    state_attributes = ("current_arrays", "m_t", "v_t")


class RobustFedProx(FlowerAggregation, FedProx):
    """Flower's FedProx (sends ``proximal-mu`` to clients) on vetted, ordered replies."""


class RobustFedAvgM(FlowerAggregation, FedAvgM):
    """Flower's FedAvgM on vetted, ordered replies."""

    state_attributes = ("current_arrays", "momentum_vector")


# name -> (class, fixed settings)
_SOFTMAX = {
    "wer-softmax": {"score": "wer"},
    "loss-softmax": {"score": "loss"},
    "fedavg": {"score": "examples", "mix": 0.0},
}
_FLOWER = {"fedadam": RobustFedAdam, "fedyogi": RobustFedYogi, "fedprox": RobustFedProx, "fedavgm": RobustFedAvgM}
_SERVER_STEP_KEYS = {"server_optimizer", "server_lr", "server_beta_1", "server_beta_2", "server_tau"}
_SOFTMAX_KEYS = {"temperature", "mix"} | _SERVER_STEP_KEYS
_FLOWER_KEYS = {
    "fedadam": {"eta", "eta_l", "beta_1", "beta_2", "tau"},
    "fedyogi": {"eta", "eta_l", "beta_1", "beta_2", "tau"},
    "fedprox": {"proximal_mu"},
    "fedavgm": {"server_learning_rate", "server_momentum"},
}
STRATEGY_NAMES = tuple(_SOFTMAX) + tuple(_FLOWER)


class UnknownStrategyError(ValueError):
    """A strategy name or setting that fedasr does not know; the message lists the valid ones."""


def build_strategy(
    name: str,
    settings: dict | None = None,
    *,
    num_clients: int,
    clients_per_round: int | None = None,
    score_fn: Callable[[ArrayRecord], float] | None = None,
) -> Strategy:
    """A ready strategy: ``clients_per_round`` of ``num_clients`` nodes train each round (all when None).

    ``settings`` are the strategy's own keys (e.g. temperature, mix, server_lr for the softmax family; eta, tau
    ... for FedAdam/FedYogi); an unknown key is an error. ``score_fn`` measures WER on the server for
    ``wer-softmax`` (None: clients report it from their validation slice).
    """
    settings = dict(settings or {})
    name = name.lower()
    per_round = num_clients if clients_per_round is None else int(clients_per_round)
    if not 1 <= per_round <= num_clients:
        raise ValueError(f"clients_per_round must lie in [1, {num_clients}] (the number of clients), got {per_round}")
    sampling = {
        "fraction_train": per_round / num_clients,
        "min_train_nodes": per_round,
        # Flower waits (without end) until this many nodes are connected: the round's own clients, never more.
        # Simulation shows the strategy one node per client (fedasr/fl/sampling.py); deployment checks the nodes
        # within node_wait seconds before the first round.
        "min_available_nodes": per_round,
        "fraction_evaluate": 0.0,
        "min_evaluate_nodes": 0,
        "train_metrics_aggr_fn": aggregate_train_metrics,
    }
    check_strategy_settings(name, settings)
    if name in _SOFTMAX:
        return MetricSoftmax(**_SOFTMAX[name], **settings, score_fn=score_fn if name == "wer-softmax" else None, **sampling)
    return _FLOWER[name](**settings, **sampling)


def check_strategy_settings(name: str, settings: dict) -> None:
    """Raise UnknownStrategyError for an unknown strategy name or a setting it does not take (with a guess)."""
    name = name.lower()
    if name not in STRATEGY_NAMES:
        raise UnknownStrategyError(f"unknown strategy {name!r}{did_you_mean([name], STRATEGY_NAMES)}; choose one of "
                                   f"{', '.join(STRATEGY_NAMES)} (strategy.name in the fl hparams)")
    allowed = (_SOFTMAX_KEYS if name != "fedavg" else _SERVER_STEP_KEYS) if name in _SOFTMAX else _FLOWER_KEYS[name]
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise UnknownStrategyError(f"strategy {name!r} does not take setting(s) {unknown}"
                                   f"{did_you_mean(unknown, allowed)}; its settings are {sorted(allowed)}")
