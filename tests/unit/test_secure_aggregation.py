"""Secure aggregation of the softmax / FedAvg strategies (fedasr/fl/secure.py): the sum of pre-weighted updates
divided by the sum of weights equals MetricSoftmax's aggregate (T down to 0.01 and below, no overflow), and the
same vectors pushed through Flower's real SecAgg+ protocol (SecAggPlusWorkflow + secaggplus_mod, in-process: masks,
Shamir shares, quantization) give the plain aggregate back."""

import copy

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord
from fedasr.fl.secure import client_weight, preweight, secure_softmax_aggregate, softmax_shift, sum_vectors, unweight
from fedasr.fl.strategies import build_strategy
from fl_fakes import reply, set_task_identity

RNG = np.random.default_rng(3)
MODELS = [{"w": RNG.normal(size=(6, 5)).astype(np.float32), "b": RNG.normal(size=5).astype(np.float32)}
          for _ in range(4)]


def softmax_strategy_aggregate(models, wers, temperature, examples=None, name="wer-softmax"):
    settings = {"temperature": temperature} if name == "wer-softmax" else {}
    strategy = build_strategy(name, settings, num_clients=len(models))
    strategy.current_arrays = {k: np.zeros_like(v) for k, v in models[0].items()}
    replies = []
    for pid, (model, wer) in enumerate(zip(models, wers)):
        metrics = MetricRecord({"num-examples": (examples or [10] * len(models))[pid], "train-loss": 1.0, "wer": wer,
                                "partition-id": pid, "word-errors": int(wer * 100), "words": 100})
        replies.append(reply(RecordDict({"arrays": numpy_to_arrayrecord(model), "metrics": metrics}), 50 + pid))
    return arrays_to_numpy(strategy.aggregate_train(1, replies)[0])


@pytest.mark.parametrize("temperature", [1.0, 0.05, 0.01])
def test_preweighted_sum_equals_the_wer_softmax_aggregate(temperature):
    wers = [0.31, 0.12, 0.45, 0.13]
    secure = secure_softmax_aggregate(MODELS, [1 - w for w in wers], temperature)
    plain = softmax_strategy_aggregate(MODELS, wers, temperature)
    for key in plain:
        np.testing.assert_allclose(secure[key], plain[key], rtol=1e-5, atol=1e-6)
        assert secure[key].dtype == plain[key].dtype


def test_preweighted_sum_equals_fedavg_with_example_counts_as_weights():
    examples = [12, 40, 7, 19]
    summed = sum_vectors([preweight(m, n) for m, n in zip(MODELS, examples)])
    secure = unweight(summed, sum(examples), {k: np.float32 for k in MODELS[0]})
    plain = softmax_strategy_aggregate(MODELS, [0.5] * 4, 1.0, examples=examples, name="fedavg")
    for key in plain:
        np.testing.assert_allclose(secure[key], plain[key], rtol=1e-5, atol=1e-6)


def test_shared_shift_keeps_tiny_temperatures_finite():
    # Unshifted, exp(s / T) overflows float64 for T = 0.001 and s near 1: exp(1000).
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.exp(np.float64(1.0) / 0.001))
    shift = softmax_shift(0.001)
    weights = [client_weight(1 - wer, 0.001, shift) for wer in (0.0, 0.004, 0.3)]
    assert all(0.0 <= w <= 1.0 for w in weights) and weights[0] == 1.0
    secure = secure_softmax_aggregate(MODELS[:3], [1.0, 0.996, 0.7], 0.001)
    np.testing.assert_allclose(secure["w"], (MODELS[0]["w"] + np.exp(-4) * MODELS[1]["w"]) / (1 + np.exp(-4)),
                               rtol=1e-5, atol=1e-6)
    # Every client far from the reference at a tiny T: all weights underflow; the error says what to send instead.
    with pytest.raises(ValueError, match="reference score"):
        secure_softmax_aggregate(MODELS[:2], [0.1, 0.05], 0.001)
    # With the previous global model's score as the reference, the same clients aggregate fine.
    recovered = secure_softmax_aggregate(MODELS[:2], [0.1, 0.05], 0.001, reference_score=0.1)
    assert np.isfinite(recovered["w"]).all()
    with pytest.raises(OverflowError, match="shift"):
        client_weight(1.0, 0.001, shift=0.0)


# ---- Flower's real SecAgg+ protocol, in-process ----------------------------------------------------------------------

def run_flower_secaggplus(vectors: list[np.ndarray], monkeypatch) -> np.ndarray:
    """Sum of ``vectors`` / len(vectors) as Flower 1.42's SecAgg+ computes it: the legacy SecAggPlusWorkflow on the
    server and secaggplus_mod on each client, messages routed in-process (the same objects a Grid would carry)."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common import FitIns, FitRes, Status, Code, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey

    set_task_identity(monkeypatch)
    node_ids = [11, 22, 33, 44][: len(vectors)]

    class Proxy(ClientProxy):
        def get_properties(self, *a, **k): raise NotImplementedError
        def get_parameters(self, *a, **k): raise NotImplementedError
        def fit(self, *a, **k): raise NotImplementedError
        def evaluate(self, *a, **k): raise NotImplementedError
        def reconnect(self, *a, **k): raise NotImplementedError

    def proxy(nid):
        p = Proxy(str(nid))
        p.node_id = nid
        return p

    aggregated = {}

    class Legacy(LegacyFedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            return [(proxy(nid), FitIns(parameters, {})) for nid in node_ids]

        def aggregate_fit(self, server_round, results, failures):
            aggregated["vector"] = parameters_to_ndarrays(results[0][1].parameters)[0]
            return results[0][1].parameters, {}

    contexts = {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
                for nid in node_ids}

    def client_train(nid):
        def train(msg, ctxt):  # a client's training reply, legacy format: its pre-weighted vector, weight 1
            fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vectors[node_ids.index(nid)]]), 1, {})
            return Message(compat.fitres_to_recorddict(fitres, True), reply_to=msg)
        return train

    class InProcessGrid:
        def send_and_receive(self, messages, timeout=None):
            replies = []
            for message in messages:
                nid = message.metadata.dst_node_id
                message = copy.deepcopy(message)  # a transport delivers each node its own copy (the mod edits it)
                answer = secaggplus_mod(message, contexts[nid], client_train(nid))
                answer.metadata.__dict__["_src_node_id"] = nid  # Flower's transport stamps the sender
                replies.append(answer)
            return replies

    server_context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server_context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    server_context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros_like(vectors[0])]), True)
    legacy = LegacyContext(server_context, strategy=Legacy())
    SecAggPlusWorkflow(num_shares=len(vectors), reconstruction_threshold=3, max_weight=1.0)(InProcessGrid(), legacy)
    assert "vector" in aggregated, "the SecAgg+ workflow halted before aggregating"
    return aggregated["vector"]


def test_flower_secaggplus_sum_of_preweighted_updates_equals_the_plain_aggregate(monkeypatch):
    wers, temperature = [0.31, 0.12, 0.45, 0.13], 0.05
    # Reference = the best score (in a run: the previous global model's), so the weights are O(1): SecAgg+ quantizes
    # absolute values, and tiny weights (reference 1 gives exp(-wer / T), down to 1e-4 here) would lose precision.
    shift = softmax_shift(temperature, reference_score=1 - min(wers))
    flat = [np.concatenate([m["w"].ravel(), m["b"].ravel()]).astype(np.float64) for m in MODELS]
    weights = [client_weight(1 - w, temperature, shift) for w in wers]
    # Each client's secure-sum vector: its pre-weighted model with its weight appended.
    vectors = [np.append(preweight({"x": x}, e)["x"], e) for x, e in zip(flat, weights)]
    rng_state = np.random.get_state()
    np.random.seed(0)  # SecAgg+ rounds stochastically with numpy's global generator
    try:
        mean = run_flower_secaggplus(vectors, monkeypatch)  # SecAgg+ returns the average of what clients sent
    finally:
        np.random.set_state(rng_state)
    secure = mean[:-1] / mean[-1]
    plain = softmax_strategy_aggregate(MODELS, wers, temperature)
    expected = np.concatenate([plain["w"].ravel(), plain["b"].ravel()])
    # Quantization: 2^22 levels over [-8, 8], so every averaged value is off by less than one step; the ratio by
    # less than step * (1 + |value|) / mean weight.
    step = 16 / 2**22
    np.testing.assert_array_less(np.abs(secure - expected), step * (1 + np.abs(expected)) / mean[-1])
    assert not np.allclose(secure, np.mean(flat, axis=0), atol=1e-2)  # the softmax weights did matter
