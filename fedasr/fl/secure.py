"""Secure aggregation for the softmax and FedAvg strategies: what a client sends so the server needs only sums.

Secure aggregation (SecAgg / SecAgg+) reveals to the server the *sum* of the clients' vectors and nothing else.
MetricSoftmax's aggregate  sum_k softmax(s / T)_k x_k  is a ratio of two such sums:

    sum_k e_k x_k / sum_k e_k,   e_k = exp(s_k / T - shift)

so each client sends its pre-weighted model e_k * x_k and its weight e_k; the server divides the securely summed
vector by the securely summed weight. FedAvg is the same with e_k = n_k (examples). The shift is one number that
every client uses (it cancels in the ratio) and keeps exp() finite: with s_k = 1 - wer_k <= 1 and
shift = reference / T, ``reference = 1`` (the best possible score) bounds every e_k by 1, so T = 0.01 cannot
overflow; the server may instead send the previous global model's score as the reference, which keeps the e_k near
1 (no underflow when every client has a high WER at a tiny T; and SecAgg+ quantizes absolute values, so weights
near 1 also keep the ratio precise: tests/unit/test_secure_aggregation.py). The client needs its own score: with secure
aggregation ``wer_source`` must be ``client`` (a server that scores each client's model would see every model).

Mixed weights (mix < 1) are two ratios: mix * (sum e_k x_k / sum e_k) + (1 - mix) * (sum n_k x_k / sum n_k), i.e.
two secure sums per round.

Status in Flower 1.42 (see the report of issue 7): the SecAgg+ protocol exists only for the legacy
Driver/Strategy API. ``SecAggPlusWorkflow.__call__`` requires a ``LegacyContext`` holding a legacy
``flwr.server.strategy.Strategy`` (flwr/server/workflow/secure_aggregation/secaggplus_workflow.py, ``__call__``,
``setup_stage`` calls ``context.strategy.configure_fit``, the unmask stage ``aggregate_fit``), and the client mod
``secaggplus_mod`` reads the training reply through ``compat.recorddict_to_fitres`` (it needs the legacy
``fitres.parameters`` / ``fitres.num_examples`` records, flwr/client/mod/secure_aggregation/secaggplus_mod.py)
and takes the weight from the integer ``num_examples``. There is no SecAgg strategy or mod for the Message API
(flwr.serverapp.strategy, flwr.clientapp.mod). This module holds the arithmetic that any secure-sum protocol
needs; tests/unit/test_secure_aggregation.py also runs it through Flower's real SecAgg+ masking and unmasking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def softmax_shift(temperature: float, reference_score: float = 1.0) -> float:
    """The shared shift: reference / T. With reference >= every client's score, every weight is <= 1."""
    if temperature <= 0:
        raise ValueError(f"softmax temperature must be > 0, got {temperature}")
    return float(reference_score) / float(temperature)


def client_weight(score: float, temperature: float, shift: float) -> float:
    """e_k = exp(s_k / T - shift) in float64; a client computes it from its own score and the shared shift."""
    with np.errstate(over="ignore"):
        value = float(np.exp(np.float64(score) / np.float64(temperature) - np.float64(shift)))
    if not np.isfinite(value):
        raise OverflowError(f"exp({score} / {temperature} - {shift}) is not finite: use a shift >= score / T "
                            "(softmax_shift with reference_score >= the largest score)")
    return value


def preweight(arrays: Mapping[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    """What a client hands to the secure sum: weight * x_k per array, in float64."""
    return {key: np.asarray(value, dtype=np.float64) * float(weight) for key, value in arrays.items()}


def sum_vectors(vectors: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The plain sum, key by key: what the secure-sum protocol reveals to the server (and nothing else)."""
    if not vectors:
        raise ValueError("nothing to sum: no client vectors")
    return {key: np.sum([np.asarray(v[key], dtype=np.float64) for v in vectors], axis=0) for key in vectors[0]}


def unweight(summed: Mapping[str, np.ndarray], total_weight: float,
             dtypes: Mapping[str, np.dtype] | None = None) -> dict[str, np.ndarray]:
    """The server's step: the securely summed pre-weighted vector divided by the summed weight."""
    if not total_weight > 0 or not np.isfinite(total_weight):
        raise ValueError(f"the summed weight must be finite and > 0, got {total_weight}: every client weight "
                         "underflowed; send a reference score closer to the clients' scores (softmax_shift)")
    return {key: (np.asarray(value, dtype=np.float64) / float(total_weight)).astype((dtypes or {}).get(key, np.float64))
            for key, value in summed.items()}


def secure_softmax_aggregate(models: Sequence[Mapping[str, np.ndarray]], scores: Sequence[float], temperature: float,
                             reference_score: float = 1.0) -> dict[str, np.ndarray]:
    """End to end with a plain sum standing in for the secure one: sum(e_k x_k) / sum(e_k).

    Equals MetricSoftmax's aggregate with mix = 1 (the tests check it); each step is the one a client or the
    server does in the protocol.
    """
    shift = softmax_shift(temperature, reference_score)
    weights = [client_weight(s, temperature, shift) for s in scores]
    summed = sum_vectors([preweight(m, w) for m, w in zip(models, weights)])
    return unweight(summed, sum(weights), {k: np.asarray(v).dtype for k, v in models[0].items()})
