"""Secure aggregation (SecAgg+) of the softmax and FedAvg strategies: the server learns only the weighted sum.

In a run (``secure_aggregation.enabled`` in the fl hparams) a round has two steps, both through the Grid:

1. training: each sampled client trains, keeps its update d_k = x_k - x in its node state and replies with its
   metrics only (examples, loss, its own WER): no arrays leave the client in the clear;
2. SecAgg+ (Flower's ``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the clients): the server sends each
   client its weight alpha_k, computed by the strategy from the metrics exactly as in a plain round (softmax over
   1 - WER, FedAvg shares, mixes), and the protocol reveals sum_k alpha_k d_k / sum_k alpha_k. The new global model
   is x + server_lr * that. A client that drops out during the protocol is unmasked from its neighbours' shares
   and left out of both sums, as a failed reply is in a plain round.

The weights are normalised (alpha_k <= 1, SecAgg+'s ``max_weight`` = 1) and quantized to ``quantization_range``
levels, so alpha_k below about 1 / quantization_range counts as 0 (at T = 0.01 these clients' softmax weights are
below 2e-7 anyway). Every value alpha_k * d_k must lie in [-clipping_range, clipping_range]: a client whose update
does not fit refuses to send it (an error naming the setting to raise) instead of being clipped silently.

Flower 1.42 has the SecAgg+ protocol only for the legacy Strategy API: ``SecAggPlusWorkflow`` needs a
``LegacyContext`` with a legacy ``flwr.server.strategy.Strategy`` (here :class:`_WeightsOnly`, which hands out the
weights and keeps the sum), and ``secaggplus_mod`` reads the legacy ``fitres`` records on the client. SecAgg+ itself
does the pre-weighting: each client uploads [w_k, w_k * d_k], masked, and the server divides the two sums; fedasr
sets w_k = alpha_k. Why the weights are computed on the server from the clients' metrics rather than by each
client (exp(s_k / T - shift), the softmax's numerator): a client cannot normalise its own weight, so at T = 0.01
an unnormalised weight falls below SecAgg+'s quantization step or above its range unless the shift is near the
best client's score, which only the server can know; and SecAgg+ carries each client's training metrics to the
server in the clear anyway (the legacy FitRes), so the WERs are no secret from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey

from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord
from fedasr.fl.protocol import CLIPPING_RANGE, FITINS_CONFIG, SECAGG_CONFIGS, UPDATE_RECORD, WEIGHT
from fedasr.fl.strategies.base import RoundOutcome
from fedasr.fl.strategies.replies import partition_of, short_error


class UpdateOutOfRangeError(ValueError):
    """A client's weighted update has values beyond SecAgg+'s clipping range; the message names the setting."""


def keep_update(context: Context, trained: ArrayRecord, received: ArrayRecord) -> None:
    """Client, training step: store d_k = trained - received until the SecAgg+ step asks for it.

    Kept in the model's dtype (float32: 1e-7 relative, far below SecAgg+'s quantization step), since the node state
    of every sampled client holds one update between the two exchanges (in simulation, all in the driver)."""
    updates = {}
    for key in sorted(trained.keys()):
        value = trained[key].numpy()
        updates[key] = (value.astype(np.float64) - received[key].numpy()).astype(value.dtype)
    context.state.array_records[UPDATE_RECORD] = numpy_to_arrayrecord(updates)


def is_secure_sum_request(msg: Message) -> bool:
    """True for the SecAgg+ step that asks for the weighted update (its content is the legacy FitIns)."""
    return FITINS_CONFIG in msg.content.config_records


def weighted_update_reply(msg: Message, context: Context) -> Message:
    """Client, SecAgg+ step: the stored update with the weight the server computed, as the legacy FitRes that
    ``secaggplus_mod`` masks (it multiplies the arrays by the weight; the update leaves only masked)."""
    if UPDATE_RECORD not in context.state.array_records:
        raise RuntimeError("SecAgg+ asked for an update this node does not hold (its training step failed or was "
                           "not received)")
    config = msg.content.config_records[FITINS_CONFIG]
    weight, clipping_range = float(config[WEIGHT]), float(config[CLIPPING_RANGE])
    record = context.state.array_records.pop(UPDATE_RECORD)
    update = [record[key].numpy() for key in sorted(record.keys())]
    largest = max(float(np.abs(a).max()) if a.size else 0.0 for a in update) * weight
    if largest > clipping_range:
        raise UpdateOutOfRangeError(
            f"weighted update value {largest:.3g} exceeds secure_aggregation.clipping_range {clipping_range:g}: "
            "raise clipping_range in the fl hparams (each doubling costs one bit of precision, see "
            "quantization_range) or lower the client lr")
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight, {})  # type: ignore[arg-type]
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """ClientApp mod: SecAgg+ messages go through Flower's ``secaggplus_mod``; every other message passes."""
    if SECAGG_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, ctxt, call_next)


class _Proxy(ClientProxy):
    """The legacy API addresses clients through proxies; SecAgg+ only reads their node ids."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *args, **kwargs):
        raise NotImplementedError

    def get_parameters(self, *args, **kwargs):
        raise NotImplementedError

    def fit(self, *args, **kwargs):
        raise NotImplementedError

    def evaluate(self, *args, **kwargs):
        raise NotImplementedError

    def reconnect(self, *args, **kwargs):
        raise NotImplementedError


class _WeightsOnly(LegacyStrategy):
    """The legacy strategy SecAgg+ drives: sends each node its weight, keeps the unmasked weighted average."""

    def __init__(self, node_weights: Mapping[int, float], clipping_range: float) -> None:
        self.node_weights = dict(node_weights)
        self.clipping_range = clipping_range
        self.average: list[np.ndarray] | None = None
        self.summed_nodes = 0

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(node), FitIns(parameters, {WEIGHT: float(weight), CLIPPING_RANGE: self.clipping_range}))
                for node, weight in sorted(self.node_weights.items())]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)  # every result holds the same sum
            self.summed_nodes = len(results)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _RecordingGrid:
    """The run's Grid, noting which node sent each error reply during the protocol (SecAgg+ keeps only reasons)
    and the bytes the replies carried (keys, shares and masked vectors travel as bytes in ConfigRecords)."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.errors: dict[int, str] = {}
        self.bytes_received = 0

    def send_and_receive(self, messages, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                self.errors.setdefault(reply.metadata.src_node_id, str(reply.error.reason))
                continue
            for record in reply.content.config_records.values():
                for value in record.values():
                    items = value if isinstance(value, list) else [value]
                    self.bytes_received += sum(len(item) for item in items if isinstance(item, bytes))
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


@dataclass
class SecureSum:
    """What one SecAgg+ step gives the server."""

    average: dict[str, np.ndarray] | None  # sum alpha_k d_k / sum alpha_k by key; None: the protocol halted
    failed: dict[int, str]  # node id -> reason, for the nodes that failed during the protocol
    bytes_received: int  # what the protocol's replies carried (keys, shares, masked vectors)


def secure_weighted_average(grid, node_weights: Mapping[int, float], keys: Sequence[str], server_round: int,
                            settings, timeout: float | None) -> SecureSum:
    """Run SecAgg+ over the nodes holding an update (``settings``: the fl hparams' SecureAggregation)."""
    if len(node_weights) < 2:  # a "sum" of one update is that update
        return SecureSum(None, {node: "secure aggregation needs at least 2 clients in a round" for node in node_weights}, 0)
    strategy = _WeightsOnly(node_weights, float(settings.clipping_range))
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(server_round)})
    state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # the clients hold their updates: nothing to send
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=strategy)
    recording = _RecordingGrid(grid)
    SecAggPlusWorkflow(
        num_shares=settings.num_shares, reconstruction_threshold=settings.reconstruction_threshold, max_weight=1.0,
        clipping_range=float(settings.clipping_range), quantization_range=int(settings.quantization_range),
        modulus_range=int(settings.modulus_range), timeout=timeout,
    )(recording, context)
    if strategy.average is None:
        failed = recording.errors or {node: "secure aggregation halted: fewer clients than the reconstruction "
                                            "threshold took part" for node in node_weights}
        return SecureSum(None, failed, recording.bytes_received)
    if len(strategy.average) != len(keys):
        raise ValueError(f"SecAgg+ returned {len(strategy.average)} arrays, the global model has {len(keys)}")
    return SecureSum(dict(zip(sorted(keys), strategy.average)), recording.errors, recording.bytes_received)


def secure_round(grid, strategy, server_round: int, arrays: ArrayRecord, replies: Sequence[Message], settings,
                 timeout: float | None) -> tuple[RoundOutcome, int]:
    """The aggregation of a secure round: ``strategy`` (MetricSoftmax) weighs the clients from their metrics,
    SecAgg+ sums the weighted updates they kept; returns (the round's outcome, bytes the protocol's replies carried).

    ``replies``: the round's usable training replies (metrics only); ``settings``: the fl hparams' SecureAggregation.
    A client that fails during the protocol is in ``dropped`` and out of the average, whose weights are renormalised
    over the clients that finished (SecAgg+ divides by their summed weights)."""
    weighed = strategy.weigh_clients(replies)
    if not weighed.replies:
        return RoundOutcome(dropped=weighed.dropped), 0
    node_weights = {m.metadata.src_node_id: float(w) for m, w in zip(weighed.replies, weighed.weights)}
    client_of_node = {m.metadata.src_node_id: partition_of(m) for m in weighed.replies}
    result = secure_weighted_average(grid, node_weights, list(arrays.keys()), server_round, settings, timeout)
    failed = [(client_of_node.get(node, node), f"secure aggregation: {short_error(reason)}")
              for node, reason in sorted(result.failed.items())]
    dropped = failed + weighed.dropped
    if result.average is None:
        return RoundOutcome(dropped=dropped), result.bytes_received
    finished = [m for m in weighed.replies if m.metadata.src_node_id not in result.failed]
    total = sum(node_weights[m.metadata.src_node_id] for m in finished)
    weights = {partition_of(m): node_weights[m.metadata.src_node_id] / total for m in finished}
    current = arrays_to_numpy(arrays)
    averaged = {key: (current[key].astype(np.float64) + result.average[key]).astype(current[key].dtype)
                for key in current}
    metrics = strategy.round_metrics(finished, np.array(list(weights.values())), dropped=len(weighed.dropped))
    outcome = RoundOutcome(arrays=numpy_to_arrayrecord(strategy.apply_server_step(averaged)), metrics=metrics,
                           clients=list(weights), weights=weights, dropped=dropped)
    return outcome, result.bytes_received
