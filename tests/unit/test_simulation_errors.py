"""When Flower's simulation engine itself stops (measured: Ray timing out at start-up on a loaded machine), the
ServerApp thread keeps waiting for replies up to round_timeout and the process would hang. `fedasr federate` must
turn the engine's RuntimeError into a clear error and exit at once (code 3) with the cause and --resume advice."""

from __future__ import annotations

import pytest

from fedasr import cli
from fedasr.fl import simulation
from fedasr.fl.config import config_from_dict
from fedasr.fl.run import FederatedRun


def engine_crash(**kwargs):
    try:
        raise Exception("The current node timed out during startup.")
    except Exception as cause:
        raise RuntimeError("An error was encountered. Ending simulation.") from cause


def test_engine_failure_becomes_a_simulation_error_naming_the_cause(tmp_path, monkeypatch):
    import flwr.simulation

    monkeypatch.setattr(flwr.simulation, "run_simulation", engine_crash)
    run = FederatedRun(config=config_from_dict({"rounds": 1, "system": "fl_fakes:FakeASR"}), seed_checkpoint=str(tmp_path / "seed"),
                       partition="p.json", output_dir=str(tmp_path / "out"), dev_manifest="dev.csv", num_clients=2)
    with pytest.raises(simulation.SimulationError, match="timed out during startup.*--resume"):
        simulation.run_simulation_for(run)


def test_federate_command_exits_with_code_3_instead_of_waiting(tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise simulation.SimulationError("the Flower simulation engine stopped (Ray). re-run with --resume")

    def leave(code):
        raise SystemExit(code)  # os._exit would end pytest itself

    monkeypatch.setattr(simulation, "federate", fail)
    monkeypatch.setattr(cli.os, "_exit", leave)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["federate", "hparams/fl/cross_silo.yaml", "--partition", "p", "--seed-checkpoint", "s",
                  "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 3
    assert "fedasr federate: error: the Flower simulation engine stopped" in capsys.readouterr().err
