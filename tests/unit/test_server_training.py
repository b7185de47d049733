"""Server-side fine-tuning of each round's aggregate (server_training): the real server loop with the fake system
and in-process clients; its settings checked when they load and when the run resolves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import MetricRecord

from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord
from fedasr.fl.config import FLConfigError, config_from_dict, load_fl_config, server_training_manifest
from fedasr.fl.run import FederatedRun
from fedasr.fl.server_app import run_server
from fedasr.pipeline import give_server_its_data
from fl_fakes import TARGET, FakeASR, FakeGrid


def make_run(tmp_path, **server_training) -> FederatedRun:
    settings = {"rounds": 2, "local_epochs": 1, "lr": 0.1, "batch_size": 4, "seed": 7, "system": "fl_fakes:FakeASR",
                "strategy": {"name": "fedavg"}, "round_timeout": 30, "server_training": server_training}
    return FederatedRun(config=config_from_dict(settings), seed_checkpoint="seed", partition="partition.json",
                        output_dir=str(tmp_path), dev_manifest="dev.csv", test_manifest="test.csv", num_clients=2)


def far_clients():
    """Every client hands back the global model moved 0.5 away from the target (the fake's WER 0 point)."""
    def train(arrays, config, pid):
        values = arrays_to_numpy(arrays)
        values["linear.weight"] = (TARGET + 0.5).numpy()
        return numpy_to_arrayrecord(values), MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": pid})
    return FakeGrid(2, train)


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_the_server_trains_the_aggregate_on_its_own_data_every_round(tmp_path, fake_clients):
    plain = rows_of(Path(run_server(far_clients(), make_run(tmp_path / "plain"), FakeASR())["output_dir"]))
    run_server(far_clients(), make_run(tmp_path / "served", epochs=3, manifest="warmup.csv"), FakeASR())
    served = rows_of(tmp_path / "served")
    for round_ in (1, 2):
        assert served[round_]["dev_wer"] < plain[round_]["dev_wer"]  # trained towards the target after aggregating
        assert served[round_]["server_train_examples"] == FakeASR().fit(
            "warmup.csv", epochs=1, lr=0.0, batch_size=4, seed=0).num_examples  # the server's manifest it trained on
        assert served[round_]["seconds"]["server_train"] >= 0.0
        assert "server_train_loss" not in plain[round_] and "server_train" not in plain[round_]["seconds"]
    run_server(far_clients(), make_run(tmp_path / "again", epochs=3, manifest="warmup.csv"), FakeASR())
    assert [r["dev_wer"] for r in rows_of(tmp_path / "again")] == [r["dev_wer"] for r in served]  # seeded per round


def test_server_training_settings_are_checked(tmp_path):
    for bad in ({"epochs": -1}, {"epochs": 1, "lr": 0}, {"epochs": 1, "batch_size": 0}, {"epoch": 1}):
        with pytest.raises(FLConfigError, match="server_training"):
            config_from_dict({"server_training": bad})
    without_data = config_from_dict({"server_training": {"epochs": 1}})
    with pytest.raises(FLConfigError, match="server_training.manifest"):
        server_training_manifest(without_data)
    missing = config_from_dict({"server_training": {"epochs": 1, "manifest": str(tmp_path / "nope.csv")}})
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        server_training_manifest(missing)
    assert server_training_manifest(config_from_dict({"server_training": {"manifest": "unused.csv"}})) is None


def test_off_leaves_the_resume_fingerprint_of_older_runs_and_on_changes_it(tmp_path):
    off, on = make_run(tmp_path), make_run(tmp_path, epochs=1, manifest="warmup.csv")
    assert "server_training" not in off.fingerprint()["config"]
    assert off.fingerprint() != on.fingerprint()


def test_the_pipeline_gives_the_server_the_warmup_speakers(tmp_path):
    config = load_fl_config("hparams/fl/cross_silo.yaml", {"server_training": {"epochs": 1}})
    notes = give_server_its_data(config, tmp_path / "warmup" / "train.csv")
    assert config.server_training.manifest == str(tmp_path / "warmup" / "train.csv") and "warm-up" in notes[0]
    default = load_fl_config("hparams/fl/cross_silo.yaml")
    assert give_server_its_data(default, tmp_path / "x.csv") == [] and default.server_training.manifest is None
