"""What a run hands back and keeps: the model chosen by dev WER, the seed included (best_model.pt, summary.json's
best_round / best_test_wer, the test WER `fedasr compare` reports), a finished run left untouched by a refused one,
bad settings refused when they load (fake system, in-process grid)."""

import json

import torch
from flwr.app import MetricRecord

from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord
from fedasr.fl.config import config_from_dict
from fedasr.fl.run import FederatedRun
from fedasr.fl.server_app import run_server
from fedasr.report.compare import load_federated_run
from fl_fakes import TARGET, FakeASR, FakeGrid


def make_run(tmp_path, rounds: int) -> FederatedRun:
    settings = {"rounds": rounds, "local_epochs": 1, "lr": 0.2, "batch_size": 4, "seed": 7, "system": "fl_fakes:FakeASR",
                "strategy": {"name": "fedavg"}, "round_timeout": 30}
    return FederatedRun(config=config_from_dict(settings), seed_checkpoint="seed", partition="partition.json",
                        output_dir=str(tmp_path), dev_manifest="dev.csv", test_manifest="test.csv", num_clients=2)


def scripted_grid(weight_per_round: dict[int, float]):
    """Every client returns the global model with its linear weight set to TARGET + offset of the round: offset 0
    is the perfect model (WER 0), a large offset a model far worse than the seed."""
    def train(arrays, config, pid):
        values = arrays_to_numpy(arrays)
        values["linear.weight"] = (TARGET + weight_per_round[int(config["server-round"])]).numpy()
        metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": pid})
        return numpy_to_arrayrecord(values), metrics
    return FakeGrid(2, train)


def test_rounds_that_never_beat_the_seed_leave_the_seed_as_best_model(tmp_path, fake_clients):
    seed_state = FakeASR().state_dict()
    summary = run_server(scripted_grid({1: 50.0, 2: 60.0}), make_run(tmp_path, rounds=2), FakeASR())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["dev_wer"] > rows[0]["dev_wer"] and rows[2]["dev_wer"] > rows[0]["dev_wer"]
    assert summary["best_round"] == 0 and summary["best_dev_wer"] == rows[0]["dev_wer"]
    best = torch.load(tmp_path / "best_model.pt")
    assert best["round"] == 0 and all(torch.equal(best["state_dict"][k], v) for k, v in seed_state.items())
    assert summary["best_test_wer"] == rows[0]["test_wer"] != summary["final_test_wer"]


def test_without_the_seeds_test_decode_a_seed_chosen_by_dev_wer_still_gets_its_test_wer(tmp_path, fake_clients):
    """evaluation.test_seed: false (what the pipeline sets: its warm-up stage reports the seed) skips round 0's test
    decode only; the seed's test WER is decoded when it is the best model."""
    run = make_run(tmp_path, rounds=2)
    run.config.evaluation.test_seed = False
    summary = run_server(scripted_grid({1: 50.0, 2: 60.0}), run, FakeASR())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "test_wer" not in rows[0] and "test_wer" in rows[-1]
    with_seed_test = run_server(scripted_grid({1: 50.0, 2: 60.0}), make_run(tmp_path / "tested", rounds=2), FakeASR())
    assert summary["best_round"] == 0 and summary["best_test_wer"] == with_seed_test["best_test_wer"]


def test_with_ema_decay_the_server_evaluates_and_keeps_the_average_while_clients_train_the_global_model(
        tmp_path, fake_clients):
    """evaluation.ema_decay d: after each round avg <- d * avg + (1 - d) * x, from the seed; dev WER, best and final
    model are avg's, the clients receive x."""
    received = []

    def train(arrays, config, pid):
        values = arrays_to_numpy(arrays)
        received.append(values["linear.weight"].copy())
        values["linear.weight"] = TARGET.numpy() + float(config["server-round"])  # x_1 = TARGET + 1, x_2 = TARGET + 2
        return numpy_to_arrayrecord(values), MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": pid})

    seed = FakeASR().state_dict()["linear.weight"].numpy()
    run = make_run(tmp_path, rounds=2)
    run.config.evaluation.ema_decay = 0.5
    summary = run_server(FakeGrid(2, train), run, FakeASR())
    average = 0.25 * seed + 0.25 * (TARGET.numpy() + 1) + 0.5 * (TARGET.numpy() + 2)
    final = torch.load(tmp_path / "final_model.pt")["state_dict"]["linear.weight"].numpy()
    assert abs(final - average).max() < 1e-5
    assert all(abs(r - (TARGET.numpy() + 1)).max() < 1e-6 for r in received[2:])  # round 2 started from x_1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fake = FakeASR()
    fake.load_state_dict({**fake.state_dict(), "linear.weight": torch.from_numpy(average)})
    assert rows[2]["dev_wer"] == summary["final_dev_wer"] == fake.evaluate("dev.csv").wer


def test_the_test_wer_reported_is_the_best_dev_rounds_even_when_it_was_not_tested(tmp_path, fake_clients):
    summary = run_server(scripted_grid({1: 0.0, 2: 40.0}), make_run(tmp_path, rounds=2), FakeASR())
    assert summary["best_round"] == 1 and summary["best_dev_wer"] == 0.0
    assert summary["best_test_wer"] == 0.0 and summary["final_test_wer"] > 0.9  # round 1 was never tested in the loop
    (tmp_path / "fl_config.json").write_text(json.dumps({"config": make_run(tmp_path, 2).config.to_dict(),
                                                         "num_clients": 2}))
    assert load_federated_run(tmp_path).test_wer == 0.0  # compare reports the model chosen by dev WER


def test_a_refused_run_leaves_a_finished_runs_files_untouched(tmp_path, fake_clients):
    """Re-running into a finished run's folder without --resume (or with changed settings) is refused before
    anything is written: summary, metrics, resolved config and models stay byte-identical."""
    import pytest

    from fedasr.fl.checkpoint import CheckpointError
    from fedasr.fl.simulation import run_simulation_for

    run_server(scripted_grid({1: 0.0}), make_run(tmp_path, rounds=1), FakeASR())
    (tmp_path / "fl_config.json").write_text('{"config": "of the finished run"}')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="Pass --resume"):
        run_simulation_for(make_run(tmp_path, rounds=1))
    changed = make_run(tmp_path, rounds=1)
    changed.resume, changed.config.local_epochs = True, 3
    with pytest.raises(CheckpointError, match="settings changed"):
        run_simulation_for(changed)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_bad_strategy_value_is_refused_when_the_settings_load():
    import pytest

    from fedasr.fl.config import FLConfigError

    with pytest.raises(FLConfigError, match="temperature must be > 0"):
        config_from_dict({"strategy": {"name": "wer-softmax", "temperature": 0}})
