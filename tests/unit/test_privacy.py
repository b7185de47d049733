"""Client-level DP (fedasr/fl/privacy.py): clipping (flat through Flower's mod, per layer), the server's
fixed-denominator noisy average, the noise std, the RDP accountant against an independent computation, and the
config rules (DP only with fedavg, delta below 1 / clients)."""

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord
from fedasr.fl.config import FLConfigError, Privacy, config_from_dict
from fedasr.fl.privacy import (
    KEY_PER_LAYER_CLIPPING_NORM,
    VARIANCE_FLOOR,
    ClientLevelDP,
    clip_per_layer,
    clip_update,
    clipping_mod,
    client_level_epsilon,
    dp_epsilon,
    noise_std,
    per_layer_norm,
    update_norm,
    with_privacy,
)
from fedasr.fl.strategies import build_strategy
from fl_fakes import FakeGrid, reply, set_task_identity

RNG = np.random.default_rng(0)


def test_flat_clipping_bounds_the_norm_and_keeps_the_direction():
    update = {"a": RNG.normal(size=(30, 20)), "b": RNG.normal(size=7)}
    clipped = clip_update(update, 1.5)
    assert update_norm(update) > 1.5
    assert update_norm(clipped) == pytest.approx(1.5, rel=1e-12)
    np.testing.assert_allclose(clipped["a"] / update["a"], update_norm(clipped) / update_norm(update))
    small = {"a": np.full(4, 0.1)}
    np.testing.assert_array_equal(clip_update(small, 1.5)["a"], small["a"])  # inside the ball: unchanged


def test_per_layer_clipping_bounds_every_array_and_the_whole_update():
    update = {"big": RNG.normal(size=500) * 10, "small": np.full(3, 1e-3), "mid": RNG.normal(size=40)}
    array_norm = per_layer_norm(2.0, len(update))
    clipped = clip_per_layer(update, array_norm)
    assert all(update_norm({k: v}) <= array_norm * (1 + 1e-12) for k, v in clipped.items())
    assert update_norm(clipped) <= 2.0 * (1 + 1e-12)
    np.testing.assert_array_equal(clipped["small"], update["small"])  # a small layer is not scaled by the big one


def _train_message(config: dict, sent: dict) -> Message:
    return Message(RecordDict({"arrays": numpy_to_arrayrecord(sent), "config": ConfigRecord(config)}),
                   dst_node_id=1, message_type="train")


def _trained_reply(msg: Message, trained: dict) -> Message:
    return Message(RecordDict({"arrays": numpy_to_arrayrecord(trained), "metrics": MetricRecord({"num-examples": 3})}),
                   reply_to=msg)


@pytest.mark.parametrize("per_layer", [False, True])
def test_client_mod_clips_the_update_it_sends(monkeypatch, per_layer):
    set_task_identity(monkeypatch)
    sent = {"w": np.zeros((4, 5), np.float32), "b": np.ones(5, np.float32)}
    trained = {"w": np.full((4, 5), 3.0, np.float32), "b": np.full(5, 9.0, np.float32)}
    key, value = (KEY_PER_LAYER_CLIPPING_NORM, 0.5) if per_layer else (KEY_CLIPPING_NORM, 0.5)
    msg = _train_message({key: value, "lr": 0.1}, sent)
    out = clipping_mod(msg, None, lambda m, _: _trained_reply(m, trained))
    got = arrays_to_numpy(out.content.array_records["arrays"])
    update = {k: got[k].astype(np.float64) - sent[k] for k in sent}
    if per_layer:
        assert all(update_norm({k: v}) == pytest.approx(0.5, rel=1e-5) for k, v in update.items())
    else:
        assert update_norm(update) == pytest.approx(0.5, rel=1e-5)
    assert out.content.metric_records["metrics"]["num-examples"] == 3  # the rest of the reply is untouched


def test_client_mod_passes_through_without_dp(monkeypatch):
    set_task_identity(monkeypatch)
    sent = {"w": np.zeros(3, np.float32)}
    trained = {"w": np.full(3, 100.0, np.float32)}
    msg = _train_message({"lr": 0.1}, sent)
    out = clipping_mod(msg, None, lambda m, _: _trained_reply(m, trained))
    np.testing.assert_array_equal(arrays_to_numpy(out.content.array_records["arrays"])["w"], trained["w"])


# ---- server side ---------------------------------------------------------------------------------------------------

START = {"w": np.zeros(20_000, np.float32), "roles.normalize.glob_mean": np.array([1.0, 2.0], np.float32),
         "bn.running_var": np.full(50, 1e-4, np.float32)}


def _replies(values: dict[int, float]) -> list[Message]:
    out = []
    for pid, value in values.items():
        arrays = {"w": np.full(20_000, value, np.float32), "roles.normalize.glob_mean": np.array([5.0, 5.0], np.float32),
                  "bn.running_var": np.full(50, 1e-4, np.float32)}
        metrics = MetricRecord({"num-examples": 10 * (pid + 1), "train-loss": 1.0, "partition-id": pid})
        out.append(reply(RecordDict({"arrays": numpy_to_arrayrecord(arrays), "metrics": metrics}), 100 + pid))
    return out


def _dp(noise: float, clip: float = 1.0, m: int = 4, n: int = 8) -> ClientLevelDP:
    inner = build_strategy("fedavg", {}, num_clients=n, clients_per_round=m)
    dp = ClientLevelDP(inner, noise_multiplier=noise, clipping_norm=clip, num_sampled_clients=m, num_clients=n,
                       delta=1e-5, frozen_keys=["*.glob_mean"], seed=7)
    dp._round_start = {k: v.copy() for k, v in START.items()}
    return dp


def test_without_noise_the_aggregate_is_the_clipped_mean_over_the_expected_clients():
    dp = _dp(noise=0.0, clip=1.0, m=4)
    # 3 of the 4 sampled clients reply; client 2's update (norm 100 * sqrt(20000)) is clipped to 1.
    outcome = dp.aggregate_round(1, _replies({0: 0.001, 1: 0.002, 2: 100.0}))
    arrays, metrics = outcome.arrays, outcome.metrics
    got = arrays_to_numpy(arrays)
    clipped_2 = 1.0 / math.sqrt(20_000)
    np.testing.assert_allclose(got["w"], (0.001 + 0.002 + clipped_2) / 4, rtol=1e-5)  # divided by m = 4, not 3
    np.testing.assert_array_equal(got["roles.normalize.glob_mean"], START["roles.normalize.glob_mean"])  # frozen
    assert outcome.weights == {0: 0.25, 1: 0.25, 2: 0.25}  # uniform, whatever the example counts
    assert outcome.report["dp_clipped_fraction"] == pytest.approx(1 / 3)
    assert metrics["num-clients"] == 3


def test_noise_has_std_z_c_over_m_and_spares_frozen_arrays():
    dp = _dp(noise=2.0, clip=0.5, m=4)
    arrays, _ = dp.aggregate_train(1, _replies({0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}))  # zero updates: pure noise
    got = arrays_to_numpy(arrays)
    expected = noise_std(2.0, 0.5, 4)
    assert expected == pytest.approx(2.0 * 0.5 / 4)
    assert float(np.std(got["w"])) == pytest.approx(expected, rel=0.03)
    assert abs(float(np.mean(got["w"]))) < 4 * expected / math.sqrt(20_000)
    np.testing.assert_array_equal(got["roles.normalize.glob_mean"], START["roles.normalize.glob_mean"])
    assert got["bn.running_var"].min() >= np.float32(VARIANCE_FLOOR)  # noise must not make a variance negative
    # Seeded noise: the same round draws the same noise (resumable); another round draws other noise.
    again = arrays_to_numpy(_dp(noise=2.0, clip=0.5, m=4).aggregate_train(1, _replies({i: 0.0 for i in range(4)}))[0])
    other = arrays_to_numpy(_dp(noise=2.0, clip=0.5, m=4).aggregate_train(2, _replies({i: 0.0 for i in range(4)}))[0])
    np.testing.assert_array_equal(again["w"], got["w"])
    assert not np.array_equal(other["w"], got["w"])


def test_configure_train_asks_clients_to_clip_and_samples_m(monkeypatch):
    set_task_identity(monkeypatch)
    grid = FakeGrid(8, train_fn=None)
    for per_layer, key in ((False, KEY_CLIPPING_NORM), (True, KEY_PER_LAYER_CLIPPING_NORM)):
        dp = _dp(noise=1.0, clip=0.8, m=3)
        dp.per_layer = per_layer
        messages = list(dp.configure_train(1, numpy_to_arrayrecord(START), ConfigRecord({"lr": 0.1}), grid))
        assert len(messages) == 3
        expected = per_layer_norm(0.8, 2) if per_layer else 0.8  # the frozen array does not count as a layer
        assert all(m.content["config"][key] == pytest.approx(expected) for m in messages)


# ---- accountant ------------------------------------------------------------------------------------------------------

def independent_epsilon(z: float, rounds: int, q: float, delta: float) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer orders (closed form, Mironov, Talwar, Zhang 2019, Sec. 3.3),
    composed over rounds, converted with Canonne, Kamath, Steinke 2020 Prop. 12; best order."""
    best = math.inf
    for a in list(range(2, 64)) + [128, 256]:
        terms = [math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1)
                 + (a - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * z * z)
                 for k in range(a + 1)] if q < 1 else [a * (a - 1) / (2 * z * z)]
        top = max(terms)
        log_a = top + math.log(sum(math.exp(t - top) for t in terms))
        rdp = rounds * log_a / (a - 1)
        best = min(best, rdp + math.log1p(-1 / a) - math.log(delta * a) / (a - 1))
    return best


@pytest.mark.parametrize("z,rounds,q", [(1.0, 20, 1.0), (1.1, 100, 0.1), (0.8, 5, 0.25)])
def test_epsilon_matches_an_independent_rdp_computation(z, rounds, q):
    ours = dp_epsilon(z, rounds, q, 1e-5)
    reference = independent_epsilon(z, rounds, q, 1e-5)
    # dp-accounting also tries fractional orders, so it may only be lower, and by little.
    assert ours <= reference * (1 + 1e-9)
    assert ours >= reference * 0.95


def test_epsilon_falls_with_noise_rises_with_rounds_and_sampling():
    assert dp_epsilon(2.0, 10, 1.0, 1e-5) < dp_epsilon(1.0, 10, 1.0, 1e-5) < dp_epsilon(0.5, 10, 1.0, 1e-5)
    assert dp_epsilon(1.0, 5, 1.0, 1e-5) < dp_epsilon(1.0, 10, 1.0, 1e-5) < dp_epsilon(1.0, 40, 1.0, 1e-5)
    assert dp_epsilon(1.0, 10, 0.1, 1e-5) < dp_epsilon(1.0, 10, 1.0, 1e-5)
    assert dp_epsilon(1.0, 10, 0.1, 1e-5, "no-amplification") == dp_epsilon(1.0, 10, 1.0, 1e-5)
    assert dp_epsilon(1.0, 0, 1.0, 1e-5) == 0.0 and dp_epsilon(0.0, 3, 1.0, 1e-5) == math.inf
    # One Gaussian release, z = 1, delta = 1e-5: epsilon 4.73 (dp-accounting), 4.75 on integer orders only.
    assert dp_epsilon(1.0, 1, 1.0, 1e-5) == pytest.approx(independent_epsilon(1.0, 1, 1.0, 1e-5), rel=0.02)


# ---- configuration -----------------------------------------------------------------------------------------------------

def test_dp_is_refused_with_softmax_weights_and_accepted_with_fedavg():
    with pytest.raises(FLConfigError, match="privacy.enabled requires strategy.name: fedavg"):
        config_from_dict({"strategy": {"name": "wer-softmax", "temperature": 0.01}, "privacy": {"enabled": True}})
    with pytest.raises(FLConfigError, match="accounting"):
        config_from_dict({"strategy": {"name": "fedavg"}, "privacy": {"enabled": True, "accounting": "moments"}})
    config = config_from_dict({"strategy": {"name": "fedavg"}, "privacy": {"enabled": True, "noise_multiplier": "0.5"}})
    assert config.privacy.noise_multiplier == 0.5
    assert config_from_dict({}).privacy.enabled is False  # off by default


def test_delta_must_be_below_one_over_the_number_of_clients():
    inner = build_strategy("fedavg", {}, num_clients=4)
    with pytest.raises(ValueError, match="privacy.delta"):
        with_privacy(inner, Privacy(enabled=True, delta=0.3), num_clients=4, clients_per_round=None, seed=0)
    assert with_privacy(inner, Privacy(enabled=False), num_clients=4, clients_per_round=None, seed=0) is inner
    wrapped = with_privacy(inner, Privacy(enabled=True), num_clients=4, clients_per_round=2, seed=0)
    assert isinstance(wrapped, ClientLevelDP) and wrapped.sampling_rate == 0.5


def test_dp_epsilon_command_prints_the_epsilon_of_fedasrs_sampling_and_its_relation(capsys):
    from fedasr.cli import main

    # Issue 13: N = 20, m = 4, z = 1, 20 rounds, delta 1e-5 was reported as 7.52 (Poisson sampling).
    assert main(["dp-epsilon", "--noise", "1", "--rounds", "20", "--clients", "20", "--clients-per-round", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epsilon"] == pytest.approx(client_level_epsilon(1.0, 20, 20, 4, 1e-5)[0]) == pytest.approx(43.74, abs=0.01)
    assert printed["neighbouring_relation"] == "replace-one" and "4 of 20" in printed["sampling"]
    assert main(["dp-epsilon", "--noise", "1", "--rounds", "20", "--clients", "20"]) == 0  # every client, every round
    printed = json.loads(capsys.readouterr().out)
    assert printed["epsilon"] == pytest.approx(dp_epsilon(1.0, 20, 1.0, 1e-5))  # no amplification
    assert printed["neighbouring_relation"] == "add-or-remove-one" and printed["epsilon_replace_one"] > printed["epsilon"]
    for bad, said in ((["--clients", "20", "--clients-per-round", "21"], "clients per round"),
                      (["--clients", "20", "--delta", "0.1"], "below 1 / clients"),
                      (["--clients", "20", "--sampling-rate", "0.2"], "--clients N --clients-per-round M")):
        assert main(["dp-epsilon", "--noise", "1", "--rounds", "3", *bad]) == 2  # clear error, no trace
        assert said in capsys.readouterr().err


def test_epsilon_is_for_m_of_n_clients_without_replacement_under_replace_one():
    epsilon, relation = client_level_epsilon(1.0, 20, 20, 4, 1e-5)
    assert relation == "replace-one"
    # What dp-accounting gives for that sampling: a Gaussian of noise multiplier z / 2, because replacing one client's
    # clipped update moves the sum by up to 2C (passing z, as the issue did, gives 11.6 and understates epsilon).
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(20, 4, dp_accounting.GaussianDpEvent(0.5)), 20)
    assert epsilon == pytest.approx(accountant.get_epsilon(1e-5))
    assert epsilon > dp_epsilon(1.0, 20, 0.2, 1e-5) == pytest.approx(7.52, abs=0.01)  # the Poisson figure was low
    # Without sampling the replace-one figure is that of a Gaussian of noise multiplier z / 2.
    assert client_level_epsilon(1.0, 20, 20, 20, 1e-5, relation="replace-one")[0] == pytest.approx(
        dp_epsilon(0.5, 20, 1.0, 1e-5))
    # Sampling only ever helps: near m = N the sampled bound is looser, and the unsampled one is kept.
    unsampled = client_level_epsilon(1.0, 20, 20, 4, 1e-5, "no-amplification")[0]
    assert epsilon < unsampled and client_level_epsilon(1.0, 20, 20, 19, 1e-5)[0] == pytest.approx(unsampled)
    with pytest.raises(ValueError, match="replace-one"):
        client_level_epsilon(1.0, 20, 20, 4, 1e-5, relation="add-or-remove-one")


def test_every_client_every_round_gets_no_amplification():
    for accounting in ("sampled", "no-amplification", "poisson"):  # "poisson": the config's old name of "sampled"
        epsilon, relation = client_level_epsilon(1.0, 20, 20, 20, 1e-5, accounting)
        assert relation == "add-or-remove-one"
        assert epsilon == pytest.approx(independent_epsilon(1.0, 20, 1.0, 1e-5), rel=0.02)  # 20 plain Gaussians
    inner = build_strategy("fedavg", {}, num_clients=4)
    silo = with_privacy(inner, Privacy(enabled=True), num_clients=4, clients_per_round=None, seed=0)
    assert silo.relation == "add-or-remove-one" and silo.epsilon(20) == pytest.approx(dp_epsilon(1.0, 20, 1.0, 1e-5))
    sampled = with_privacy(inner, Privacy(enabled=True, delta=1e-6), num_clients=12, clients_per_round=4, seed=0)
    assert sampled.relation == "replace-one" and sampled.epsilon(5) == client_level_epsilon(1.0, 5, 12, 4, 1e-6)[0]
    # metrics.jsonl says which relation each round's epsilon holds for.
    assert sampled.round_report(5) == {"dp_epsilon": sampled.epsilon(5), "dp_delta": 1e-6, "dp_relation": "replace-one"}
    assert silo.round_report(1)["dp_relation"] == "add-or-remove-one"


# ---- the real server loop with DP (fake ASR system, in-process grid) ---------------------------------------------------

def _dp_run(tmp_path, monkeypatch, **extra):
    from fedasr.fl import client_app
    from fedasr.fl.run import FederatedRun

    set_task_identity(monkeypatch)
    clients = tuple({"train": f"client-{i}/train.csv", "valid": f"client-{i}/valid.csv"} for i in range(12))
    monkeypatch.setattr(client_app, "partition_clients", lambda partition: clients)
    client_app.cached_system.cache_clear()
    settings = {"rounds": 4, "local_epochs": 2, "lr": 0.2, "batch_size": 4, "seed": 7, "system": "fl_fakes:FakeASR",
                "clients_per_round": 4, "strategy": {"name": "fedavg"},
                "privacy": {"enabled": True, "noise_multiplier": 0.5, "clipping_norm": 0.05,
                            "frozen_keys": ["normaliser_mean"]}}
    return FederatedRun(config=config_from_dict(settings), seed_checkpoint="seed", partition="p.json",
                        output_dir=str(tmp_path), dev_manifest="dev.csv", test_manifest="test.csv", num_clients=12,
                        **extra)


def _grid():
    from fedasr.fl import client_app

    return FakeGrid(12, lambda arrays, config, pid: client_app.train_on_partition(arrays, config, "p.json", pid))


def _rows(path):
    rows = [json.loads(line) for line in open(path / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k != "seconds" and "fit_seconds" not in k} for r in rows]


def test_dp_server_loop_logs_epsilon_and_a_resumed_run_draws_the_same_noise(tmp_path, monkeypatch):
    from fedasr.fl.server_app import run_server

    summary = run_server(_grid(), _dp_run(tmp_path / "full", monkeypatch))
    rows = _rows(tmp_path / "full")
    # 4 of 12 clients drawn without replacement each round: the epsilon of that sampling (replace-one), not Poisson's.
    assert [r["dp_epsilon"] for r in rows[1:]] == pytest.approx(
        [client_level_epsilon(0.5, r, 12, 4, 1e-5)[0] for r in (1, 2, 3, 4)])
    assert summary["dp_epsilon"] == rows[-1]["dp_epsilon"] and summary["dp_delta"] == 1e-5
    assert all(r["dp_max_update_norm"] > 0.05 for r in rows[1:])  # the fake clients do not clip: the server does
    run_server(_grid(), _dp_run(tmp_path / "cut", monkeypatch, stop_after_round=2))
    run_server(_grid(), _dp_run(tmp_path / "cut", monkeypatch, resume=True))
    assert _rows(tmp_path / "cut") == rows
