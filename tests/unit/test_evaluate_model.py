"""What `fedasr evaluate` accepts as a model (fedasr.models.evaluate.locate_model): a seed checkpoint folder, a
federated run folder (its best model) or a model file of one; anything else a clear error naming the path and the
fix. The real decoding of a run folder is tests/integration/test_federated.py."""

from __future__ import annotations

import json

import pytest
import torch

from fedasr.cli import main as cli_main
from fedasr.fl.run_folder import load_model_file
from fedasr.models.evaluate import ModelNotFoundError, locate_model


@pytest.fixture
def run_folder(tmp_path):
    seed = tmp_path / "warmup" / "seed_checkpoint"
    seed.mkdir(parents=True)
    run = tmp_path / "cross-silo"
    run.mkdir()
    (run / "fl_config.json").write_text(json.dumps({"seed_checkpoint": str(seed)}))
    (run / "best_model.pt").write_bytes(b"weights")
    (run / "final_model.pt").write_bytes(b"weights")
    return run, seed


def test_a_run_folder_means_its_best_model_in_the_seed_it_names(run_folder):
    run, seed = run_folder
    assert locate_model(run) == (seed, run / "best_model.pt")
    assert locate_model(run / "final_model.pt") == (seed, run / "final_model.pt")
    assert locate_model(seed) == (seed, None)  # a seed checkpoint folder: that model


def test_what_cannot_be_evaluated_is_named_with_the_fix(run_folder, tmp_path):
    run, seed = run_folder
    with pytest.raises(ModelNotFoundError, match="not found .give a seed checkpoint folder"):
        locate_model(tmp_path / "nowhere")
    loose = tmp_path / "loose.pt"
    loose.write_bytes(b"weights")
    with pytest.raises(ModelNotFoundError, match="loose.pt: a model file needs its run's fl_config.json"):
        locate_model(loose)
    (run / "best_model.pt").unlink()
    with pytest.raises(ModelNotFoundError, match="without best_model.pt"):
        locate_model(run)
    seed.rmdir()
    with pytest.raises(ModelNotFoundError, match="seed_checkpoint .* is gone"):
        locate_model(run / "final_model.pt")


def test_a_damaged_or_foreign_model_file_is_named(tmp_path):
    damaged = tmp_path / "best_model.pt"
    damaged.write_bytes(b"not a torch file")
    with pytest.raises(ModelNotFoundError, match="best_model.pt: not a readable model file"):
        load_model_file(damaged)
    foreign = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ModelNotFoundError, match="other.pt: no state_dict in it"):
        load_model_file(foreign)


def test_the_cli_reports_a_missing_model_without_a_traceback(tmp_path, capsys):
    code = cli_main(["evaluate", str(tmp_path / "nowhere"), str(tmp_path / "test.csv"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "nowhere: not found" in err
