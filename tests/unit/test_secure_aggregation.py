"""Secure aggregation of the softmax / FedAvg strategies (fedasr/fl/secure.py): client updates pushed through
Flower's real SecAgg+ protocol by fedasr's own server and client code (secure_weighted_average: SecAggPlusWorkflow;
secure_aggregation_mod -> secaggplus_mod -> weighted_update_reply; in-process: masks, Shamir shares, quantization,
dropouts) give MetricSoftmax's plain aggregate back, for T down to 0.01 and for FedAvg; the settings that cannot
work are refused. A real federated run with secure aggregation: tests/integration/test_secure_run.py."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, MetricRecord, RecordDict

from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord
from fedasr.fl.config import SecureAggregation
from fedasr.fl.secure import keep_update, secure_weighted_average
from fedasr.fl.strategies.metric_softmax import softmax_weights
from fedasr.fl.strategies import build_strategy
from fl_fakes import InProcessGrid, reply, set_task_identity

REPO = Path(__file__).resolve().parents[2]
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


# ---- Flower's real SecAgg+ protocol, in-process, through fedasr's server and client code -------------------------------

class FailingGrid(InProcessGrid):
    """fedasr's in-process SecAgg+ grid where the nodes in ``broken`` are gone from protocol stage ``broken_at`` on
    (by default after they shared their keys: the dropout SecAgg+ recovers from)."""

    def __init__(self, contexts, broken=(), broken_at="collect_masked_vectors"):
        super().__init__(contexts)
        self.broken, self.broken_at, self.seen = set(broken), broken_at, set()

    def deliver(self, message):
        stage = message.content.config_records["secaggplus_configs"]["stage"]
        self.seen.add(stage)
        if message.metadata.dst_node_id in self.broken and self.broken_at in self.seen:
            raise ConnectionError(f"node {message.metadata.dst_node_id} is gone")
        return super().deliver(message)


def run_secure_round(updates, weights, monkeypatch, settings=None, broken=(), seed=0):
    """SecAgg+ over nodes 11, 22, ... holding ``updates`` (as keep_update stores them), weights ``weights``."""
    set_task_identity(monkeypatch)
    node_ids = [11 * (i + 1) for i in range(len(updates))]
    zero = {k: np.zeros_like(v) for k, v in updates[0].items()}
    contexts = {}
    for nid, update in zip(node_ids, updates):
        contexts[nid] = Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
        keep_update(contexts[nid], numpy_to_arrayrecord(update), numpy_to_arrayrecord(zero))
    rng_state = np.random.get_state()
    np.random.seed(seed)  # SecAgg+ rounds stochastically with numpy's global generator
    try:
        return secure_weighted_average(FailingGrid(contexts, broken), dict(zip(node_ids, weights)), list(zero),
                                       server_round=1, settings=settings or SecureAggregation(enabled=True),
                                       timeout=None)
    finally:
        np.random.set_state(rng_state)


def updates_and_plain(wers, temperature):
    """Client updates (the models as deltas from zero), their softmax weights, MetricSoftmax's plain aggregate."""
    updates = [{k: v.astype(np.float64) * 0.1 for k, v in m.items()} for m in MODELS]  # |values| < 1, as updates are
    weights = softmax_weights([1 - w for w in wers], temperature)
    plain = softmax_strategy_aggregate([{k: v.astype(np.float32) for k, v in u.items()} for u in updates], wers,
                                       temperature)
    return updates, weights, plain


@pytest.mark.parametrize("temperature", [1.0, 0.05, 0.01])
def test_flower_secaggplus_weighted_sum_equals_the_plain_wer_softmax_aggregate(monkeypatch, temperature):
    # T = 0.01 (the authors' code): weights down to 1e-14, below SecAgg+'s quantization of the weights; they count
    # as 0 there, as good as in the plain float64 sum.
    wers = [0.31, 0.12, 0.45, 0.13]
    updates, weights, plain = updates_and_plain(wers, temperature)
    result = run_secure_round(updates, weights, monkeypatch)
    assert result.failed == {} and result.bytes_received > 0
    # Quantization: 2^22 levels over [-8, 8]; each client's weighted value is off by less than one step, so the
    # average by less than one step per client (the weights sum to 1).
    step = 16 / 2**22
    for key in plain:
        np.testing.assert_array_less(np.abs(result.average[key] - plain[key]), len(updates) * step)
        assert not np.allclose(result.average[key], np.mean([u[key] for u in updates], axis=0), atol=1e-3)


def test_flower_secaggplus_weighted_sum_equals_the_plain_fedavg_aggregate(monkeypatch):
    examples = [12, 40, 7, 19]
    updates = [{k: v.astype(np.float64) * 0.1 for k, v in m.items()} for m in MODELS]
    plain = softmax_strategy_aggregate([{k: v.astype(np.float32) for k, v in u.items()} for u in updates],
                                       [0.5] * 4, 1.0, examples=examples, name="fedavg")
    result = run_secure_round(updates, np.array(examples) / sum(examples), monkeypatch)
    for key in plain:
        np.testing.assert_array_less(np.abs(result.average[key] - plain[key]), len(updates) * 16 / 2**22)


def test_a_client_lost_during_secaggplus_is_unmasked_and_left_out(monkeypatch):
    wers, temperature = [0.31, 0.12, 0.45, 0.13], 1.0
    updates, weights, _ = updates_and_plain(wers, temperature)
    result = run_secure_round(updates, weights, monkeypatch, broken=[33])
    assert list(result.failed) == [33] and "gone" in result.failed[33]
    survivors = [0, 1, 3]  # SecAgg+ divides by the summed weights of the clients that finished
    expected = sum(weights[i] * updates[i]["w"] for i in survivors) / sum(weights[i] for i in survivors)
    np.testing.assert_array_less(np.abs(result.average["w"] - expected), 4 * 16 / 2**22)


def test_an_update_beyond_the_clipping_range_is_refused_not_clipped(monkeypatch):
    wers = [0.31, 0.12, 0.45, 0.13]
    updates, weights, _ = updates_and_plain(wers, 1.0)
    updates[1] = {k: v * 1000 for k, v in updates[1].items()}  # a client whose weighted update exceeds the range
    result = run_secure_round(updates, weights, monkeypatch, settings=SecureAggregation(enabled=True, clipping_range=8.0))
    assert list(result.failed) == [22] and "secure_aggregation.clipping_range" in result.failed[22]
    survivors = [0, 2, 3]
    expected = sum(weights[i] * updates[i]["w"] for i in survivors) / sum(weights[i] for i in survivors)
    np.testing.assert_array_less(np.abs(result.average["w"] - expected), 4 * 16 / 2**22)


def test_secure_round_needs_two_clients_and_halts_below_the_threshold(monkeypatch):
    updates, weights, _ = updates_and_plain([0.3, 0.2, 0.4, 0.1], 1.0)
    alone = run_secure_round(updates[:1], [1.0], monkeypatch)
    assert alone.average is None and "at least 2 clients" in alone.failed[11]
    halted = run_secure_round(updates, weights, monkeypatch, broken=[11, 22, 33],
                              settings=SecureAggregation(enabled=True, num_shares=1.0, reconstruction_threshold=0.75))
    assert halted.average is None and set(halted.failed) == {11, 22, 33}


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": {"name": "fedadam"}}, "strategy.name"),
    ({"wer_source": "server"}, "wer_source: client"),
    ({"privacy": {"enabled": True}, "strategy": {"name": "fedavg"}}, "privacy"),
    ({"update_encoding": "fp16"}, "update_encoding"),
    ({"clients_per_round": 1}, "clients_per_round >= 2"),
    ({"secure_aggregation": {"num_shares": 2}}, "num_shares"),
    ({"secure_aggregation": {"reconstruction_threshold": 1.5}}, "reconstruction_threshold"),
    ({"secure_aggregation": {"modulus_range": 1000}}, "modulus_range"),
])
def test_secure_aggregation_settings_that_cannot_work_are_refused(overrides, message):
    from fedasr.fl.config import FLConfigError, load_fl_config, overlay

    base = {"wer_source": "client", "secure_aggregation": {"enabled": True}}
    with pytest.raises(FLConfigError, match=message):
        load_fl_config(REPO / "hparams/fl/cross_silo.yaml", overlay(base, overrides))


def test_secure_aggregation_settings_that_work_are_accepted():
    from fedasr.fl.config import load_fl_config

    config = load_fl_config(REPO / "hparams/fl/cross_device.yaml", {"wer_source": "client",
                                                            "secure_aggregation": {"enabled": True, "num_shares": 5,
                                                                                   "reconstruction_threshold": 3}})
    assert config.secure_aggregation.enabled and config.secure_aggregation.num_shares == 5
