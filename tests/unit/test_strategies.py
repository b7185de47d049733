"""Aggregation of each strategy with mock replies: weights, mix, server lr, overflow safety, diverged clients."""

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord
from fedasr.fl.strategies import UnknownStrategyError, build_strategy, mixed_weights, softmax_weights
from fedasr.fl.strategies.base import vet_and_aggregate
from fl_fakes import FakeGrid, reply, set_task_identity


def client_reply(partition_id, value, *, examples=10, wer=0.5, loss=1.0, node=None):
    arrays = numpy_to_arrayrecord({"w": np.full((2, 2), value, dtype=np.float32),
                                   "frozen": np.array([3.0, 4.0], dtype=np.float32)})
    metrics = MetricRecord({"num-examples": examples, "train-loss": loss, "wer": wer, "partition-id": partition_id,
                            "word-errors": int(round(wer * 100)) if wer == wer else 0, "words": 100})
    return reply(RecordDict({"arrays": arrays, "metrics": metrics}), node if node is not None else 500 + partition_id)


def aggregate(strategy, replies, current=0.0):
    """(new arrays as numpy or None, train metrics, the strategy's RoundOutcome) of one round of ``replies``."""
    strategy.current_arrays = {"w": np.full((2, 2), current, dtype=np.float32), "frozen": np.array([3.0, 4.0], dtype=np.float32)}
    outcome = vet_and_aggregate(strategy, 1, replies)
    return (None if outcome.arrays is None else arrays_to_numpy(outcome.arrays)), outcome.metrics, outcome


def test_softmax_weights_match_the_formula():
    wers = np.array([0.1, 0.3, 0.6])
    weights = softmax_weights(1 - wers, temperature=1.0)
    expected = np.exp(1 - wers) / np.exp(1 - wers).sum()
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    assert weights.dtype == np.float64


def test_softmax_does_not_overflow_with_wer_near_zero_and_small_temperature():
    weights = softmax_weights(1 - np.array([0.0, 1e-9, 0.02, 1.0]), temperature=0.01)
    assert np.isfinite(weights).all() and math.isclose(weights.sum(), 1.0)
    assert weights[0] > weights[1] > weights[2] > weights[3] >= 0
    # the unshifted version overflows: exp(100) is fine in float64, exp(1e5) is not
    extreme = softmax_weights([1.0, 0.5], temperature=1e-5)
    np.testing.assert_allclose(extreme, [1.0, 0.0], atol=1e-300)


def test_mix_blends_softmax_with_example_weights():
    scores, examples = [0.9, 0.5], [30, 10]
    weights = mixed_weights(scores, examples, temperature=0.1, mix=0.25)
    expected = 0.25 * softmax_weights(scores, 0.1) + 0.75 * np.array([0.75, 0.25])
    np.testing.assert_allclose(weights, expected)
    np.testing.assert_allclose(mixed_weights(scores, examples, 0.1, mix=0.0), [0.75, 0.25])
    with pytest.raises(ValueError, match="mix"):
        mixed_weights(scores, examples, 0.1, mix=1.5)


def test_wer_softmax_aggregate_uses_client_wer_and_keeps_frozen_stats():
    strategy = build_strategy("wer-softmax", {"temperature": 0.5}, num_clients=3)
    replies = [client_reply(2, 3.0, wer=0.9), client_reply(0, 1.0, wer=0.1), client_reply(1, 2.0, wer=0.4)]
    arrays, metrics, outcome = aggregate(strategy, replies)
    w = softmax_weights(1 - np.array([0.1, 0.4, 0.9]), 0.5)  # partition order 0, 1, 2
    np.testing.assert_allclose(arrays["w"], np.full((2, 2), w @ [1.0, 2.0, 3.0]), rtol=1e-6)
    assert np.array_equal(arrays["frozen"], [3.0, 4.0])
    assert outcome.clients == [0, 1, 2]
    assert metrics["local-wer"] == pytest.approx((10 + 40 + 90) / 300)  # summed errors / summed words
    assert metrics["max-weight"] == pytest.approx(w.max())


def test_loss_softmax_favours_the_lower_loss():
    strategy = build_strategy("loss-softmax", {"temperature": 1.0}, num_clients=2)
    arrays, _, _ = aggregate(strategy, [client_reply(0, 0.0, loss=1.0), client_reply(1, 1.0, loss=3.0)])
    w = softmax_weights([-1.0, -3.0], 1.0)
    np.testing.assert_allclose(arrays["w"], w[1], rtol=1e-6)


def test_fedavg_weights_are_example_counts():
    strategy = build_strategy("fedavg", {}, num_clients=2)
    arrays, metrics, _ = aggregate(strategy, [client_reply(0, 0.0, examples=30, loss=1.0), client_reply(1, 4.0, examples=10, loss=2.0)])
    np.testing.assert_allclose(arrays["w"], 1.0)
    assert metrics["train-loss"] == pytest.approx((30 * 1.0 + 10 * 2.0) / 40)


def test_server_learning_rate_moves_part_of_the_way():
    strategy = build_strategy("fedavg", {"server_lr": 0.5}, num_clients=2)
    arrays, _, _ = aggregate(strategy, [client_reply(0, 4.0), client_reply(1, 4.0)], current=2.0)
    np.testing.assert_allclose(arrays["w"], 3.0)
    assert np.array_equal(arrays["frozen"], [3.0, 4.0])


@pytest.mark.parametrize("optimizer", ["momentum", "adam", "yogi"])
def test_server_optimizers_on_the_softmax_update_follow_their_formulas(optimizer):
    """Two rounds of wer-softmax with a server optimizer: the step is computed from the weighted average's
    pseudo-gradient d with the moments of the previous round (written out here for one scalar weight)."""
    lr, b1, b2, tau = 0.5, 0.8, 0.9, 1e-3
    strategy = build_strategy("wer-softmax", {"server_optimizer": optimizer, "server_lr": lr, "server_beta_1": b1,
                                              "server_beta_2": b2, "server_tau": tau}, num_clients=2)
    x, m, v = 2.0, 0.0, 0.0
    for average in (4.0, 3.0):
        arrays, _, _ = aggregate(strategy, [client_reply(0, average, wer=0.2), client_reply(1, average, wer=0.6)],
                                 current=x)
        d = average - x
        if optimizer == "momentum":
            m = b1 * m + d
            x = x + lr * m
        else:
            m = b1 * m + (1 - b1) * d
            v = b2 * v + (1 - b2) * d * d if optimizer == "adam" else v - (1 - b2) * d * d * np.sign(v - d * d)
            x = x + lr * m / (math.sqrt(v) + tau)
        np.testing.assert_allclose(arrays["w"], x, rtol=1e-5)
        assert np.array_equal(arrays["frozen"], [3.0, 4.0])  # an unchanged array has d = 0: no step
    assert x != pytest.approx(3.0)  # the momentum carried the model past the second round's average


def test_the_default_server_step_is_the_published_formula_and_keeps_no_state():
    strategy = build_strategy("wer-softmax", {}, num_clients=2)
    arrays, _, outcome = aggregate(strategy, [client_reply(0, 4.0, wer=0.0), client_reply(1, 2.0, wer=1.0)], current=9.0)
    e = math.exp(1.0)
    np.testing.assert_allclose(arrays["w"], (4.0 * e + 2.0) / (e + 1.0), rtol=1e-6)  # x <- sum_k alpha_k x_k
    assert strategy.state_dict() == {}


def test_server_side_scoring_replaces_client_wer():
    seen = []

    def score_fn(arrays):
        value = float(arrays["w"].numpy().mean())
        seen.append(value)
        return 0.0 if value == 2.0 else 1.0  # the model with w=2 is perfect on the server subset

    strategy = build_strategy("wer-softmax", {"temperature": 0.01}, num_clients=2, score_fn=score_fn)
    assert not strategy.wants_client_wer
    arrays, _, _ = aggregate(strategy, [client_reply(0, 1.0, wer=0.0), client_reply(1, 2.0, wer=1.0)])
    assert sorted(seen) == [1.0, 2.0]
    np.testing.assert_allclose(arrays["w"], 2.0, rtol=1e-6)


@pytest.mark.parametrize("bad", ["arrays", "loss", "wer"])
def test_a_client_reporting_nan_is_dropped_and_counted(bad):
    strategy = build_strategy("wer-softmax", {"temperature": 0.01}, num_clients=3)
    broken = client_reply(1, float("nan") if bad == "arrays" else 9.0,
                          loss=float("nan") if bad == "loss" else 1.0, wer=float("nan") if bad == "wer" else 0.0)
    arrays, metrics, outcome = aggregate(strategy, [client_reply(0, 1.0, wer=0.2), broken, client_reply(2, 1.0, wer=0.3)])
    np.testing.assert_allclose(arrays["w"], 1.0, rtol=1e-6)
    assert [pid for pid, _ in outcome.dropped] == [1]
    assert metrics["dropped-clients"] == 1


def test_all_clients_diverged_keeps_the_global_model():
    strategy = build_strategy("wer-softmax", {}, num_clients=1, clients_per_round=1)
    arrays, metrics, _ = aggregate(strategy, [client_reply(0, float("inf"))])
    assert arrays is None and metrics is None


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm", "fedprox"])
def test_flower_strategies_by_name_drop_diverged_clients(name, monkeypatch):
    set_task_identity(monkeypatch)
    settings = {"proximal_mu": 0.1} if name == "fedprox" else {}
    strategy = build_strategy(name, settings, num_clients=2)
    start = numpy_to_arrayrecord({"w": np.zeros((2, 2), dtype=np.float32), "frozen": np.array([3.0, 4.0], dtype=np.float32)})
    messages = list(strategy.configure_train(1, start, ConfigRecord({"lr": 0.1}), FakeGrid(2, None)))
    assert len(messages) == 2
    outcome = vet_and_aggregate(strategy, 1, [client_reply(0, 1.0), client_reply(1, float("nan"))])
    values = arrays_to_numpy(outcome.arrays)
    assert np.isfinite(values["w"]).all() and (values["w"] > 0).all()
    assert outcome.dropped[0][0] == 1


def test_cross_device_sampling_size_and_client_wer_request(monkeypatch):
    set_task_identity(monkeypatch)
    strategy = build_strategy("wer-softmax", {"temperature": 0.05}, num_clients=50, clients_per_round=7)
    config = ConfigRecord({"lr": 0.1})
    start = numpy_to_arrayrecord({"w": np.zeros(1, dtype=np.float32)})
    messages = list(strategy.configure_train(1, start, config, FakeGrid(50, None)))
    assert len(messages) == 7 and len({m.metadata.dst_node_id for m in messages}) == 7
    assert config["report-wer"] is True


def test_unknown_names_and_settings_are_clear_errors():
    with pytest.raises(UnknownStrategyError, match="wer-softmax"):
        build_strategy("fedmagic", {}, num_clients=2)
    with pytest.raises(UnknownStrategyError, match="temprature"):
        build_strategy("wer-softmax", {"temprature": 0.1}, num_clients=2)
    with pytest.raises(ValueError, match="clients_per_round"):
        build_strategy("fedavg", {}, num_clients=2, clients_per_round=3)


def test_fl_hparams_files_load_as_written():
    from fedasr.fl.config import load_fl_config

    silo = load_fl_config("hparams/fl/cross_silo.yaml")
    assert silo.mode == "cross-silo" and silo.clients_per_round is None and silo.strategy["name"] == "wer-softmax"


def test_naming_another_strategy_drops_the_old_ones_settings():
    from fedasr.fl.config import load_fl_config, parse_overrides

    device = load_fl_config("hparams/fl/cross_device.yaml", parse_overrides(["strategy={name: fedadam, eta: 0.01}"]))
    assert device.clients_per_round == 20 and device.strategy == {"name": "fedadam", "eta": 0.01}


def test_dotted_overrides_reach_nested_settings():
    from fedasr.fl.config import load_fl_config, parse_overrides

    tuned = load_fl_config("hparams/fl/cross_silo.yaml", parse_overrides(["strategy.temperature=1", "annealing.patience=2"]))
    assert tuned.strategy["temperature"] == 1 and tuned.annealing.patience == 2


@pytest.mark.parametrize("hparams, overrides, message", [
    ("hparams/fl/cross_silo.yaml", {"roundz": 3}, "unknown key"),
    ("hparams/fl/cross_silo.yaml", {"mode": "p2p"}, "mode must be one of"),
    ("missing.yaml", {}, "not found"),
    ("hparams/fl/cross_silo.yaml", {"strategy": {"server_optimizer": "nesterov"}}, "server_optimizer must be one of"),
    ("hparams/fl/cross_silo.yaml", {"strategy": {"server_optimizer": "adam", "server_beta_2": 1.0}}, "server_beta_2"),
    ("hparams/fl/cross_silo.yaml", {"strategy": {"name": "fedavg", "server_optimizer": "adam"},
                                    "privacy": {"enabled": True}}, "privacy.enabled takes its own server step"),
])
def test_bad_fl_settings_are_refused_with_the_reason(tmp_path, hparams, overrides, message):
    from fedasr.fl.config import FLConfigError, load_fl_config

    path = tmp_path / hparams if hparams == "missing.yaml" else hparams
    with pytest.raises(FLConfigError, match=message):
        load_fl_config(path, overrides)


def test_an_override_without_a_value_is_refused():
    from fedasr.fl.config import FLConfigError, parse_overrides

    with pytest.raises(FLConfigError, match="KEY=VALUE"):
        parse_overrides(["rounds"])


def test_fl_hparams_extends_overlays_a_base_file(tmp_path):
    from fedasr.fl.config import FLConfigError, load_fl_config

    silo = load_fl_config("hparams/fl/cross_silo.yaml")
    device = load_fl_config("hparams/fl/cross_device.yaml")
    # cross_device.yaml holds only what differs; the rest (nested keys included) comes from cross_silo.yaml.
    assert device.mode == "cross-device" and device.rounds == 50 and device.annealing.patience == 2
    assert device.annealing.factor == silo.annealing.factor and device.lr == silo.lr
    assert device.evaluation.server_wer_utterances == 50
    assert device.evaluation.test_decoding == silo.evaluation.test_decoding and device.strategy == silo.strategy
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(FLConfigError, match="cycle"):
        load_fl_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(FLConfigError, match="extended by"):
        load_fl_config(tmp_path / "c.yaml")
