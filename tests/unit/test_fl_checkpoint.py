"""Server checkpoints: round trips, atomic replacement, and a killed run resumed = the uninterrupted run.

The server loop, strategies and ClientApp training function are the real ones; the ASR system is the fake of
fl_fakes and the Grid runs the client function in-process (the real-Flower version is in tests/integration).
"""

import json

import numpy as np
import pytest
import torch

from fedasr.fl import client_app
from fedasr.fl.checkpoint import (
    CheckpointError,
    ServerState,
    checkpoint_path,
    load_server_state,
    save_server_state,
)
from fedasr.fl.arrays import numpy_to_arrayrecord
from fedasr.fl.config import config_from_dict
from fedasr.fl.run import FederatedRun
from fedasr.fl.server_app import run_server
from fedasr.fl.strategies import build_strategy
from fl_fakes import FakeASR, FakeGrid


def make_run(tmp_path, *, stop_after_round=0, resume=False, **config):
    settings = {"rounds": 4, "local_epochs": 2, "lr": 0.2, "batch_size": 4, "seed": 7, "system": "fl_fakes:FakeASR",
                "strategy": {"name": "wer-softmax", "temperature": 0.05}, "wer_source": "server"}
    settings.update(config)
    return FederatedRun(config=config_from_dict(settings), seed_checkpoint="seed", partition="partition.json",
                        output_dir=str(tmp_path), dev_manifest="dev.csv", test_manifest="test.csv", num_clients=12,
                        resume=resume, stop_after_round=stop_after_round)


def fake_grid():
    return FakeGrid(12, lambda arrays, config, pid: client_app.train_on_partition(arrays, config, "p.json", pid))


def rows_without_timings(path):
    rows = [json.loads(line) for line in open(path / "metrics.jsonl")]
    for row in rows:
        row.pop("seconds", None)
        row.pop("train_fit_seconds_sum", None)
        row.pop("train_fit_seconds_max", None)
    return rows


def test_server_state_round_trip(tmp_path):
    state = ServerState(round=3, arrays={"w": np.arange(4, dtype=np.float32)}, annealer={"lr": 0.5},
                        rng={"x": 1}, best_wer=0.25, best_round=2, fingerprint={"a": 1})
    save_server_state(tmp_path, state)
    loaded = load_server_state(tmp_path)
    assert loaded.round == 3 and loaded.best_wer == 0.25 and loaded.annealer == {"lr": 0.5}
    assert np.array_equal(loaded.arrays["w"], state.arrays["w"])
    assert load_server_state(tmp_path / "nothing") is None


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_server_state(tmp_path, ServerState(round=1, arrays={}))
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_server_state(tmp_path, ServerState(round=2, arrays={}))
    assert load_server_state(tmp_path).round == 1
    assert [p.name for p in checkpoint_path(tmp_path).parent.iterdir()] == ["server_state.pt"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    checkpoint_path(tmp_path).parent.mkdir(parents=True)
    checkpoint_path(tmp_path).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Delete it to start over"):
        load_server_state(tmp_path)


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_flower_optimizer_state_round_trips(name, tmp_path):
    strategy = build_strategy(name, {"server_momentum": 0.9} if name == "fedavgm" else {}, num_clients=2)
    arrays = {"w": np.ones(3, dtype=np.float32)}
    if name == "fedadam":
        strategy.current_arrays, strategy.m_t, strategy.v_t = arrays, {"w": np.full(3, 0.1)}, {"w": np.full(3, 0.2)}
    else:
        strategy.current_arrays, strategy.momentum_vector = numpy_to_arrayrecord(arrays), [np.full(3, 0.3)]
    save_server_state(tmp_path, ServerState(round=1, arrays=arrays, strategy=strategy.state_dict()))
    fresh = build_strategy(name, {"server_momentum": 0.9} if name == "fedavgm" else {}, num_clients=2)
    fresh.load_state_dict(load_server_state(tmp_path).strategy)
    if name == "fedadam":
        assert np.array_equal(fresh.v_t["w"], strategy.v_t["w"])
    else:
        assert np.array_equal(fresh.current_arrays["w"].numpy(), arrays["w"])
        assert np.array_equal(fresh.momentum_vector[0], strategy.momentum_vector[0])


@pytest.mark.parametrize("strategy,clients_per_round", [({"name": "wer-softmax", "temperature": 0.05}, 4),
                                                         ({"name": "fedadam", "eta": 0.05}, None),
                                                         ({"name": "wer-softmax", "server_optimizer": "adam",
                                                           "server_lr": 0.05}, 4),
                                                         ({"name": "fedavg", "ema": 0.6}, 4)])
def test_killed_run_resumed_matches_uninterrupted_run(tmp_path, fake_clients, strategy, clients_per_round):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    strategy = dict(strategy)
    ema = {"evaluation": {"ema_decay": strategy.pop("ema")}} if "ema" in strategy else {}
    full_grid = fake_grid()
    full = run_server(full_grid, make_run(full_dir, strategy=strategy, clients_per_round=clients_per_round, **ema), FakeASR())

    first_grid = fake_grid()
    partial = run_server(first_grid, make_run(split_dir, strategy=strategy, clients_per_round=clients_per_round,
                                              stop_after_round=2, **ema), FakeASR())
    assert not partial["finished"] and load_server_state(split_dir).round == 2
    second_grid = fake_grid()
    resumed = run_server(second_grid, make_run(split_dir, strategy=strategy, clients_per_round=clients_per_round,
                                               resume=True, **ema), FakeASR())

    assert resumed["finished"] and full["finished"]
    assert rows_without_timings(split_dir) == rows_without_timings(full_dir)
    assert first_grid.rounds_sent + second_grid.rounds_sent == full_grid.rounds_sent
    final_full = torch.load(full_dir / "final_model.pt")["state_dict"]
    final_resumed = torch.load(split_dir / "final_model.pt")["state_dict"]
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    assert full["final_dev_wer"] < full["seed_dev_wer"]


def test_cross_device_samples_differ_between_rounds_and_lr_anneals(tmp_path, fake_clients):
    grid = fake_grid()
    built_before = FakeASR.instances
    summary = run_server(grid, make_run(tmp_path, clients_per_round=3, rounds=6, lr=0.01,
                                        annealing={"threshold": 0.5}), FakeASR())
    assert all(len(sent) == 3 for sent in grid.rounds_sent)
    assert len({tuple(s) for s in grid.rounds_sent}) > 1
    lrs = [row["lr"] for row in summary["history"][1:]]
    assert lrs[0] == 0.01 and lrs[-1] < lrs[0]
    assert FakeASR.instances - built_before == 2  # the server one + one client system for 18 messages (cached)


def test_existing_run_needs_resume_and_same_settings(tmp_path, fake_clients):
    run_server(fake_grid(), make_run(tmp_path, stop_after_round=1), FakeASR())
    with pytest.raises(CheckpointError, match="--resume"):
        run_server(fake_grid(), make_run(tmp_path), FakeASR())
    with pytest.raises(CheckpointError, match="settings changed"):
        run_server(fake_grid(), make_run(tmp_path, resume=True, lr=0.5), FakeASR())


def test_resume_refuses_a_seed_retrained_at_the_same_path(tmp_path, fake_clients):
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "model.ckpt").write_bytes(b"weights of the first warm-up")
    out = tmp_path / "run"

    def run(**kwargs):
        federated = make_run(out, **kwargs)
        federated.seed_checkpoint = str(seed)
        return federated

    run_server(fake_grid(), run(stop_after_round=1), FakeASR())
    (seed / "model.ckpt").write_bytes(b"weights of another warm-up")
    with pytest.raises(CheckpointError, match="seed_checkpoint_sha256"):
        run_server(fake_grid(), run(resume=True), FakeASR())


def test_client_partition_errors_name_the_fix(fake_clients):
    from flwr.app import Context, RecordDict

    with pytest.raises(client_app.PartitionLookupError, match="partition-id=I num-partitions=12"):
        client_app.client_for("p.json", 12)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(client_app.PartitionLookupError, match="--node-config"):
        client_app.node_partition(context, {"partition": "p.json"})
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 3, "partition": "/silo/own.json"},
                      state=RecordDict(), run_config={})
    assert client_app.node_partition(context, {"partition": "p.json"}) == ("/silo/own.json", 3)


def test_softmax_server_optimizer_moments_round_trip_and_a_mismatch_is_refused(tmp_path):
    from fedasr.fl.checkpoint import restore_strategy_state

    settings = {"server_optimizer": "adam", "server_lr": 0.1}
    strategy = build_strategy("wer-softmax", settings, num_clients=2)
    strategy.current_arrays = {"w": np.zeros(3, np.float32)}
    strategy.apply_server_step({"w": np.array([1.0, -2.0, 0.5], np.float32)})
    save_server_state(tmp_path, ServerState(round=1, arrays={}, strategy=strategy.state_dict()))
    saved = load_server_state(tmp_path)
    fresh = build_strategy("wer-softmax", settings, num_clients=2)
    restore_strategy_state(fresh, saved, checkpoint_path(tmp_path))
    for moment in ("first_moment", "second_moment"):
        kept = getattr(fresh.server_optimizer, moment)["w"]
        assert kept.any() and np.array_equal(kept, getattr(strategy.server_optimizer, moment)["w"])
    with pytest.raises(CheckpointError, match="server_state.pt: the strategy state does not fit.*'adam'.*'momentum'"):
        restore_strategy_state(build_strategy("wer-softmax", {"server_optimizer": "momentum"}, num_clients=2), saved,
                               checkpoint_path(tmp_path))
    with pytest.raises(CheckpointError, match="holds no moments for server optimizer 'adam'"):
        restore_strategy_state(build_strategy("wer-softmax", settings, num_clients=2),
                               ServerState(round=1, arrays={}), checkpoint_path(tmp_path))


def test_an_older_strategy_state_loads_and_one_of_another_strategy_is_refused(tmp_path):
    from fedasr.fl.checkpoint import restore_strategy_state

    # Checkpoints written before strategies declared their state hold MetricSoftmax's current_arrays: not needed.
    softmax = build_strategy("wer-softmax", {}, num_clients=2)
    softmax.load_state_dict({"current_arrays": {"kind": "plain", "value": {"w": np.ones(3, np.float32)}}})
    foreign = ServerState(round=1, arrays={}, strategy={"momentum_vector": {"kind": "plain", "value": [np.ones(3)]}})
    with pytest.raises(CheckpointError, match="server_state.pt: the strategy state does not fit.*momentum_vector"):
        restore_strategy_state(build_strategy("fedadam", {}, num_clients=2), foreign, checkpoint_path(tmp_path))


def test_the_default_server_optimizer_leaves_the_resume_fingerprint_of_older_runs_unchanged():
    from fedasr.fl.config import config_from_dict
    from fedasr.fl.run import FederatedRun

    def fingerprint(strategy):
        return FederatedRun(config=config_from_dict({"strategy": strategy}), seed_checkpoint="seed", partition="p.json",
                            output_dir="out", dev_manifest="dev.csv", num_clients=2).fingerprint()["config"]

    written_before = {"name": "wer-softmax", "temperature": 1.0, "mix": 1.0, "server_lr": 1.0}
    assert fingerprint(written_before) == fingerprint({**written_before, "server_optimizer": "sgd"})
    assert fingerprint(written_before) != fingerprint({**written_before, "server_optimizer": "momentum"})
