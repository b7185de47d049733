"""Simulation runs: the server assigns the partitions a round trains, from (seed, round) alone, so a cross-device
run samples the same clients whatever node ids Flower gives its virtual nodes (they are random per start), and a
resumed run continues exactly like an uninterrupted one. The real server loop and ClientApp training function run
with the fake ASR system and a fake grid (tests/unit/fl_fakes.py)."""

from __future__ import annotations

import json
import random

import torch

from fedasr.fl import client_app
from fedasr.fl.config import config_from_dict
from fedasr.fl.protocol import sampling_seed
from fedasr.fl.run import FederatedRun
from fedasr.fl.server_app import run_server
from fl_fakes import FakeASR, FakeGrid

CLIENTS = 10


def cross_device_run(out, *, rounds=4, stop_after_round=0, resume=False) -> FederatedRun:
    config = config_from_dict({"mode": "cross-device", "rounds": rounds, "local_epochs": 1, "lr": 0.2, "batch_size": 4,
                               "seed": 7, "clients_per_round": 3, "system": "fl_fakes:FakeASR",
                               "strategy": {"name": "fedavg"}, "wer_source": "server"})
    return FederatedRun(config=config, seed_checkpoint="seed", partition="p.json", output_dir=str(out),
                        dev_manifest="dev.csv", num_clients=CLIENTS, resume=resume, stop_after_round=stop_after_round,
                        assign_partitions=True)


def grid(start: int) -> FakeGrid:
    """A simulation start: random 64-bit node ids, as Flower draws them, so their order differs between starts."""
    fake = FakeGrid(CLIENTS, lambda arrays, cfg, pid: client_app.train_on_partition(arrays, cfg, "p.json", pid))
    node_ids = random.Random(start).sample(range(1, 2**63), CLIENTS)
    fake.node_to_partition = dict(zip(node_ids, range(CLIENTS)))
    return fake


def rows_of(out) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds" and "fit_seconds" not in k}
            for line in open(out / "metrics.jsonl")]


def test_sampled_clients_come_from_seed_and_round_not_from_node_ids(tmp_path, fake_clients):
    first, second = grid(1), grid(2)  # two starts of the simulation: other node ids
    run_server(first, cross_device_run(tmp_path / "a"), FakeASR())
    run_server(second, cross_device_run(tmp_path / "b"), FakeASR())
    expected = [sorted(random.Random(sampling_seed(7, r)).sample(range(CLIENTS), 3)) for r in range(1, 5)]
    assert first.rounds_sent == second.rounds_sent == expected
    assert [r["clients"] for r in rows_of(tmp_path / "a")[1:]] == expected


def test_cross_device_run_stopped_and_resumed_on_new_node_ids_matches_the_uninterrupted_run(tmp_path, fake_clients):
    run_server(grid(1), cross_device_run(tmp_path / "full"), FakeASR())
    run_server(grid(1), cross_device_run(tmp_path / "cut", stop_after_round=2), FakeASR())
    run_server(grid(3), cross_device_run(tmp_path / "cut", resume=True), FakeASR())
    assert rows_of(tmp_path / "cut") == rows_of(tmp_path / "full")
    final, reference = (torch.load(tmp_path / d / "final_model.pt")["state_dict"] for d in ("cut", "full"))
    assert all(torch.equal(final[k], reference[k]) for k in reference)
