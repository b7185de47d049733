"""`flwr run .` as shipped: the run config's defaults and resolution (fedasr/fl/run.py), and any number of SuperNodes
(fedasr/fl/sampling.py): in simulation the server maps the clients onto the nodes there are; in deployment a run
short of SuperNodes stops within node-wait seconds with an error naming num-supernodes, never waits for ever.
The server loop and ClientApp training function run with the fake ASR system and fake grid (tests/unit/fl_fakes.py);
the real `flwr run .` is tests/integration/test_flower_app_run.py."""

from __future__ import annotations

import json
import logging
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from fedasr.data.manifest import manifest_path, write_manifest
from fedasr.data.partition import load_partition, partition_manifest
from fedasr.fl import client_app
from fedasr.fl.config import FLConfigError, config_from_dict
from fedasr.fl.flower_compat import without_run_simulation_notice
from fedasr.fl.run import FederatedRun, run_from_run_config
from fedasr.fl.sampling import NotEnoughNodesError, wait_for_nodes
from fedasr.fl.server_app import run_server
from fl_fakes import FakeASR, FakeGrid
from test_partition import make_utterances

REPO = Path(__file__).resolve().parents[2]


def simulated_run(out, *, clients=4, per_round=None, secure=False) -> FederatedRun:
    config = config_from_dict({"mode": "cross-silo", "rounds": 2, "local_epochs": 1, "lr": 0.2, "batch_size": 4,
                               "seed": 7, "clients_per_round": per_round, "system": "fl_fakes:FakeASR",
                               "strategy": {"name": "fedavg"}, "wer_source": "server"})
    return FederatedRun(config=config, seed_checkpoint="seed", partition="p.json", output_dir=str(out),
                        dev_manifest="dev.csv", num_clients=clients, assign_partitions=True)


def fake_grid(nodes: int) -> FakeGrid:
    return FakeGrid(nodes, lambda arrays, cfg, pid: client_app.train_on_partition(arrays, cfg, "p.json", pid))


@pytest.mark.parametrize("nodes", [1, 2, 4, 10])
def test_simulation_trains_every_client_on_any_number_of_supernodes(tmp_path, fake_clients, nodes):
    grid = fake_grid(nodes)
    summary = run_server(grid, simulated_run(tmp_path), FakeASR())
    assert summary["finished"] and grid.rounds_sent == [[0, 1, 2, 3], [0, 1, 2, 3]]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [sorted(r["clients"]) for r in rows[1:]] == [[0, 1, 2, 3]] * 2 and all(not r["failed"] for r in rows)


def test_clients_of_a_round_do_not_depend_on_the_number_of_supernodes(tmp_path, fake_clients):
    sent = []
    for nodes in (2, 12):
        grid = fake_grid(nodes)
        run_server(grid, simulated_run(tmp_path / str(nodes), clients=12, per_round=5), FakeASR())
        sent.append(grid.rounds_sent)
    assert sent[0] == sent[1] and all(len(r) == 5 for r in sent[0])


def test_simulated_secure_aggregation_with_too_few_supernodes_names_num_supernodes(tmp_path, fake_clients):
    from fedasr.fl.sampling import ClientSlotGrid

    view = ClientSlotGrid(fake_grid(2), 4)
    messages = [type("M", (), {"metadata": type("Meta", (), {})()})() for _ in range(4)]
    with pytest.raises(NotEnoughNodesError, match="num-supernodes"):
        view.route(messages, distinct=True)
    view.route(messages[:2], distinct=True)
    assert len({m.metadata.dst_node_id for m in messages[:2]}) == 2


def test_deployment_short_of_supernodes_stops_within_seconds_naming_num_supernodes():
    started = time.monotonic()
    with pytest.raises(NotEnoughNodesError, match="num-supernodes") as err:
        wait_for_nodes(fake_grid(2), 4, timeout=1.0, what=" (num-clients)")
    assert time.monotonic() - started < 5 and "2 SuperNode(s) connected" in str(err.value)
    assert wait_for_nodes(fake_grid(5), 4, timeout=0) == sorted(fake_grid(5).get_node_ids())


def test_strategy_waits_only_for_the_clients_of_a_round():
    from fedasr.fl.strategies import build_strategy

    strategy = build_strategy("fedavg", num_clients=20, clients_per_round=8)
    assert strategy.min_available_nodes == 8 and strategy.min_train_nodes == 8


# ---- the run config ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_like(tmp_path_factory) -> Path:
    """A folder laid out as `make demo` leaves it (the paths of pyproject's defaults), with a fake seed."""
    root = tmp_path_factory.mktemp("app")
    manifests = root / "results/demo/manifests"
    write_manifest(manifest_path(manifests, "train"), make_utterances(40, seed=0))
    for split in ("dev", "test"):
        write_manifest(manifest_path(manifests, split), make_utterances(3, seed=1))
    partition_manifest(manifests, root / "results/demo/partitions/cross-silo", mode="cross-silo", clients=4,
                       warmup_speakers=4, seed=0)
    (root / "results/demo/runs/synth/fr/warmup/ctc_tiny/seed1234/seed_checkpoint").mkdir(parents=True)
    (root / "hparams/fl").mkdir(parents=True)
    (root / "hparams/fl/cross_silo.yaml").write_text((REPO / "hparams/fl/cross_silo.yaml").read_text())
    return root


def shipped_run_config() -> dict:
    return dict(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def test_shipped_defaults_point_at_the_demo_and_resolve_against_the_app_folder(demo_like, monkeypatch):
    monkeypatch.chdir(demo_like)
    run = run_from_run_config(shipped_run_config(), simulation=True)
    demo = demo_like / "results/demo"
    assert run.partition == load_partition(demo / "partitions/cross-silo")["path"]
    assert run.output_dir == str(demo / "flwr-run") and run.num_clients == 4 and run.assign_partitions
    assert run.dev_manifest == str(demo / "manifests/dev.csv") and run.test_manifest == str(demo / "manifests/test.csv")
    assert run.config.rounds == shipped_run_config()["num-server-rounds"]
    demo = yaml.safe_load((REPO / "hparams/pipeline/demo.yaml").read_text(encoding="utf-8"))["cross_silo"]["set"]
    shipped = json.loads(shipped_run_config()["overrides"])  # "the demo's cross-silo settings", as pyproject says
    assert {k: v for k, v in shipped.items() if k != "seed"} == {k: v for k, v in demo.items() if k != "rounds"}


def test_num_server_rounds_overrides_rounds_and_zero_keeps_the_hparams(demo_like, monkeypatch):
    monkeypatch.chdir(demo_like)
    config = shipped_run_config()
    assert run_from_run_config({**config, "num-server-rounds": 7}).config.rounds == 7
    config["overrides"] = json.dumps({"rounds": 4})
    assert run_from_run_config({**config, "num-server-rounds": 0}).config.rounds == 4
    assert run_from_run_config({**config, "num-server-rounds": 4}).config.rounds == 4
    # Given twice and differing (e.g. the shipped num-server-rounds = 3 beside overrides rounds=2): refused, not
    # silently decided.
    from fedasr.fl.config import FLConfigError
    with pytest.raises(FLConfigError, match="num-server-rounds is 2 but overrides set rounds=4"):
        run_from_run_config({**config, "num-server-rounds": 2})


def test_relative_paths_fall_back_to_the_installed_checkout(demo_like, monkeypatch, tmp_path):
    from fedasr.fl import run as run_module

    monkeypatch.chdir(tmp_path)  # e.g. a local SuperLink started from another folder
    monkeypatch.setattr(run_module, "_editable_checkout", lambda: demo_like)
    run = run_from_run_config(shipped_run_config())
    assert run.output_dir == str(demo_like / "results/demo/flwr-run")


def test_missing_demo_outputs_say_to_run_make_demo(tmp_path, monkeypatch):
    from fedasr.fl import run as run_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_module, "_editable_checkout", lambda: None)
    (tmp_path / "hparams/fl").mkdir(parents=True)
    (tmp_path / "hparams/fl/cross_silo.yaml").write_text((REPO / "hparams/fl/cross_silo.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="make demo"):
        run_from_run_config(shipped_run_config())
    with pytest.raises(FLConfigError, match="make demo"):
        run_from_run_config({**shipped_run_config(), "partition": ""})


def test_only_the_run_simulation_notice_is_silenced(caplog):
    flower = logging.getLogger("flwr")
    with caplog.at_level(logging.WARNING, logger="flwr"), without_run_simulation_notice():
        flower.warning("DEPRECATED FEATURE: %s", "The `run_simulation` function is deprecated and will be removed")
        flower.warning("DEPRECATED FEATURE: %s", "something else")
    assert [r.getMessage() for r in caplog.records] == ["DEPRECATED FEATURE: something else"]


def test_run_config_overrides_take_the_set_rule_or_json():
    from fedasr.fl.run import run_config_overrides

    pairs = run_config_overrides("lr=0.002 evaluation.test_decoding=greedy strategy.temperature=0.5")
    assert pairs == {"lr": 0.002, "evaluation": {"test_decoding": "greedy"}, "strategy": {"temperature": 0.5}}
    assert run_config_overrides('{"lr": 0.002, "evaluation": {"test_decoding": "greedy"}}') == {
        "lr": 0.002, "evaluation": {"test_decoding": "greedy"}}
    assert run_config_overrides("") == {} and run_config_overrides(None) == {}
    with pytest.raises(ValueError, match="not a JSON object"):
        run_config_overrides('{"lr": 0.002')
    with pytest.raises(ValueError, match="KEY=VALUE"):
        run_config_overrides("rounds")

