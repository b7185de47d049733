"""Aggregation strategies: the metric-softmax family (WER/loss softmax, FedAvg) and Flower's own, by name; each
returns a RoundOutcome from aggregate_round (base.py)."""

from fedasr.fl.strategies.base import RoundOutcome, RoundStrategy
from fedasr.fl.strategies.factory import STRATEGY_NAMES, UnknownStrategyError, build_strategy
from fedasr.fl.strategies.metric_softmax import MetricSoftmax, mixed_weights, softmax_weights

__all__ = ["RoundOutcome", "RoundStrategy", "STRATEGY_NAMES", "UnknownStrategyError", "build_strategy", "MetricSoftmax", "mixed_weights", "softmax_weights"]
