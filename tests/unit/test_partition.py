"""Partitioning invariants on generated manifests (no audio), plus one check on the real fixture corpus."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedasr.cli import main as cli_main
from fedasr.data.manifest import Utterance, manifest_path, read_manifest, write_manifest
from fedasr.data.partition import (
    PartitionError,
    PartitionNotFoundError,
    balance_silos,
    load_partition,
    partition_manifest,
    plan_partition,
    read_client_manifests,
)

MODES = ("cross-silo", "cross-device", "iid")


def make_utterances(n_speakers: int, seed: int = 0, *, min_utts: int = 1, max_utts: int = 60) -> list[Utterance]:
    """A Common-Voice-like manifest: heavy-tailed utterances per speaker, 1.5-7 s clips."""
    rng = np.random.default_rng(seed)
    counts = np.clip(np.round(rng.lognormal(mean=2.0, sigma=1.0, size=n_speakers)), min_utts, max_utts).astype(int)
    utterances = []
    for s, count in enumerate(counts):
        spk = f"{s:0128x}"
        for k in range(count):
            uid = f"s{s:05d}_{k:03d}"
            duration = float(rng.uniform(1.5, 7.0))
            utterances.append(Utterance(uid, duration, f"/clips/{uid}.mp3", spk, "le chat dort"))
    return utterances


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("manifest")
    write_manifest(manifest_path(folder, "train"), make_utterances(300, seed=0))
    return folder


def ids_of(path) -> list[str]:
    return [u.ID for u in read_manifest(path)]


def speakers_of(path) -> set[str]:
    return {u.spk_id for u in read_manifest(path)}


def run(manifest_dir, out, **options):
    options = {"warmup_speakers": 20, "seed": 0, **options}
    return partition_manifest(manifest_dir, out, **options)


# ---------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("mode", MODES)
def test_every_utterance_lands_in_exactly_one_place(manifest_dir, tmp_path, mode):
    partition = run(manifest_dir, tmp_path, mode=mode, clients=None if mode == "cross-device" else 8)["partition"]
    loaded = load_partition(tmp_path)
    placed = ids_of(loaded["warmup"]["train"])
    for client in loaded["clients"]:
        train, valid = ids_of(client["train"]), ids_of(client["valid"])
        assert (len(train), len(valid)) == (client["utterances"], client["valid_utterances"])
        assert len(train) >= 1 and len(valid) >= 1
        placed += train + valid
    total = len(read_manifest(manifest_path(manifest_dir, "train")))
    excluded = sum(v for k, v in partition["excluded"].items() if k.endswith("_utterances"))
    assert len(placed) == len(set(placed)), "an utterance is in two places"
    assert len(placed) + excluded == total


@pytest.mark.parametrize("mode", MODES)
def test_warmup_speakers_never_appear_in_a_client(manifest_dir, tmp_path, mode):
    run(manifest_dir, tmp_path, mode=mode)
    loaded = load_partition(tmp_path)
    warmup = set(loaded["warmup"]["speakers"])
    assert len(warmup) == 20 and speakers_of(loaded["warmup"]["train"]) == warmup
    for client in loaded["clients"]:
        assert not warmup & (speakers_of(client["train"]) | speakers_of(client["valid"]))


@pytest.mark.parametrize("mode", ["cross-silo", "cross-device"])
def test_no_speaker_is_in_two_clients(manifest_dir, tmp_path, mode):
    run(manifest_dir, tmp_path, mode=mode)
    owners = Counter()
    for client in load_partition(tmp_path)["clients"]:
        spk = speakers_of(client["train"]) | speakers_of(client["valid"])
        assert spk == set(client["speakers"])
        owners.update(spk)
    assert owners and max(owners.values()) == 1


def test_same_seed_same_partition_other_seed_other_partition(manifest_dir, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run(manifest_dir, tmp_path / name, mode="cross-silo", seed=seed)
    text = {name: (tmp_path / name / "partition.json").read_text() for name in "abc"}
    assert text["a"] == text["b"]
    a, c = json.loads(text["a"]), json.loads(text["c"])
    assert a["warmup"]["speakers"] != c["warmup"]["speakers"]
    assert [x["speakers"] for x in a["clients"]] != [x["speakers"] for x in c["clients"]]


def test_warmup_set_is_the_same_for_every_mode_and_client_count(manifest_dir, tmp_path):
    warmups = [
        run(manifest_dir, tmp_path / f"{mode}{clients}", mode=mode, clients=clients)["partition"]["warmup"]["speakers"]
        for mode in MODES
        for clients in (None, 5)
    ]
    assert all(w == warmups[0] for w in warmups)


def test_silos_are_balanced_by_hours():
    utterances = make_utterances(1000, seed=3)
    plan = plan_partition(utterances, mode="cross-silo", clients=10, warmup_speakers=117, seed=0)
    hours = [sum(utterances[r].duration for r in c.train + c.valid) for c in plan.clients]
    assert len(hours) == 10 and max(hours) / min(hours) < 1.02


def test_balance_silos_puts_longest_speakers_first_into_the_lightest_silo():
    hours = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 2.0}
    # a -> 0; b -> 1; c -> 1 (4 < 5); d -> 0 (5 < 7); e -> 0 (7 = 7: lowest silo index)
    assert [set(silo) for silo in balance_silos(hours, 2, seed=0)] == [{"a", "d", "e"}, {"b", "c"}]
    with pytest.raises(PartitionError, match="only 5 speakers"):
        balance_silos(hours, 6, seed=0)


def test_local_validation_slice_sizes(manifest_dir, tmp_path):
    partition = run(manifest_dir, tmp_path, mode="cross-device", valid_fraction=0.25)["partition"]
    for client in partition["clients"]:
        n = client["utterances"] + client["valid_utterances"]
        assert client["valid_utterances"] == min(max(1, round(0.25 * n)), n - 1)


def test_cross_device_minimum_and_cap_are_counted():
    utterances = make_utterances(200, seed=1)
    per_speaker = Counter(u.spk_id for u in utterances)
    plan = plan_partition(utterances, mode="cross-device", warmup_speakers=0, min_utterances=5, seed=0)
    few = [s for s, n in per_speaker.items() if n < 5]
    assert len(plan.clients) == 200 - len(few)
    assert plan.excluded["below_min_utterances_speakers"] == len(few)
    assert plan.excluded["below_min_utterances_utterances"] == sum(per_speaker[s] for s in few)
    capped = plan_partition(utterances, mode="cross-device", clients=50, warmup_speakers=0, min_utterances=5, seed=0)
    assert len(capped.clients) == 50
    assert capped.excluded["over_client_cap_speakers"] == 200 - len(few) - 50


def test_single_utterance_client_is_excluded_and_counted():
    utterances = [Utterance(f"u{i}", 2.0, f"/c/{i}.mp3", spk, "x") for i, spk in enumerate("aabbbc")]
    plan = plan_partition(utterances, mode="cross-device", warmup_speakers=0, min_utterances=1, seed=0)
    assert sorted(c.speakers[0] for c in plan.clients) == ["a", "b"]
    assert plan.excluded == {"single_utterance_clients": 1, "single_utterance_client_utterances": 1}


def test_iid_clients_have_equal_sizes(manifest_dir, tmp_path):
    partition = run(manifest_dir, tmp_path, mode="iid", clients=7)["partition"]
    sizes = [c["utterances"] + c["valid_utterances"] for c in partition["clients"]]
    assert len(sizes) == 7 and max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------------------------------- files


def test_files_stats_and_summary(manifest_dir, tmp_path):
    result = run(manifest_dir, tmp_path, mode="cross-silo", clients=4)
    partition = json.loads((tmp_path / "partition.json").read_text())
    assert partition == result["partition"]
    assert partition["version"] == 1 and partition["mode"] == "cross-silo" and partition["seed"] == 0
    assert partition["source"] == str((manifest_dir / "train.csv").resolve())
    assert [c["id"] for c in partition["clients"]] == ["000", "001", "002", "003"]
    assert partition["clients"][2]["train"] == "clients/002/train.csv"
    assert partition["warmup"]["train"] == "warmup/train.csv"
    assert partition["stats"]["clients"] == 4
    with open(tmp_path / "stats.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == ["000", "001", "002", "003"]
    assert [int(r["utterances"]) for r in rows] == [c["utterances"] for c in partition["clients"]]
    table = result["summary_table"]
    assert "cross-silo" in table and "warm-up  : 20 speakers" in table and "clients  : 4" in table


def test_rerun_does_nothing_and_new_options_replace_old_files(manifest_dir, tmp_path):
    run(manifest_dir, tmp_path, mode="cross-silo", clients=6)
    stamp = (tmp_path / "partition.json").stat().st_mtime_ns
    assert run(manifest_dir, tmp_path, mode="cross-silo", clients=6)["skipped"]
    assert (tmp_path / "partition.json").stat().st_mtime_ns == stamp
    again = run(manifest_dir, tmp_path, mode="cross-silo", clients=3)
    assert not again["skipped"] and len(again["partition"]["clients"]) == 3
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == ["000", "001", "002"]


def test_client_reads_only_its_own_manifests(manifest_dir, tmp_path):
    run(manifest_dir, tmp_path, mode="cross-silo", clients=3)
    partition = load_partition(tmp_path / "partition.json")
    assert Path(partition["clients"][0]["train"]).is_absolute()
    for other in ("001", "002"):
        for name in ("train.csv", "valid.csv"):
            (tmp_path / "clients" / other / name).unlink()
    train, valid = read_client_manifests(partition, 0)
    assert len(train) == partition["clients"][0]["utterances"] and len(valid) >= 1
    assert read_client_manifests(tmp_path, "000") == (train, valid)
    with pytest.raises(PartitionError, match="out of range: it has 3 clients"):
        read_client_manifests(partition, 3)


# ---------------------------------------------------------------------------------------------- errors


def test_too_many_warmup_speakers_is_a_clear_error(manifest_dir, tmp_path):
    with pytest.raises(PartitionError, match=r"warmup_speakers=300 but the train manifest has only 300 speakers"):
        run(manifest_dir, tmp_path, mode="cross-silo", warmup_speakers=300)
    assert not (tmp_path / "partition.json").exists()


def test_missing_manifest_and_bad_options(tmp_path, manifest_dir):
    with pytest.raises(PartitionNotFoundError, match=r"train\.csv: train manifest not found. Run `fedasr prepare`"):
        partition_manifest(tmp_path / "nowhere", tmp_path / "out", mode="cross-silo")
    with pytest.raises(PartitionError, match="mode='silo'"):
        partition_manifest(manifest_dir, tmp_path / "out", mode="silo")
    with pytest.raises(PartitionError, match="valid_fraction=1.5"):
        partition_manifest(manifest_dir, tmp_path / "out", mode="iid", valid_fraction=1.5)


def test_load_partition_errors(tmp_path):
    with pytest.raises(PartitionNotFoundError, match="Run `fedasr partition`"):
        load_partition(tmp_path)
    (tmp_path / "partition.json").write_text("{not json")
    with pytest.raises(PartitionError, match="not a readable partition file"):
        load_partition(tmp_path)
    (tmp_path / "partition.json").write_text(json.dumps({"version": 1, "mode": "iid"}))
    with pytest.raises(PartitionError, match="missing key"):
        load_partition(tmp_path)


def test_cli_prints_the_summary_and_reports_errors(manifest_dir, tmp_path, capsys):
    argv = ["partition", str(manifest_dir), str(tmp_path), "--mode", "cross-device", "--clients", "30"]
    assert cli_main([*argv, "--warmup-speakers", "20"]) == 0
    out = capsys.readouterr().out
    assert "cross-device" in out and "clients  : 30" in out
    assert cli_main(["partition", str(tmp_path / "none"), str(tmp_path), "--mode", "iid"]) == 2
    assert "train manifest not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- scale and real data


@pytest.mark.slow
def test_planning_scales_to_common_voice_size():
    utterances = make_utterances(20_000, seed=5, max_utts=300)
    assert len(utterances) > 200_000
    started = time.perf_counter()
    for mode in MODES:
        plan_partition(utterances, mode=mode, clients=2000 if mode == "cross-device" else None, seed=0)
    # Linear-time grouping takes a few seconds here; anything quadratic would take hours.
    assert time.perf_counter() - started < 60


@pytest.mark.slow  # builds the session's synthetic corpus when first to ask for it
def test_fixture_partitions_point_at_real_clips(cross_silo_partition, cross_device_partition):
    from tests.conftest import FIXTURE_SILOS, FIXTURE_WARMUP_SPEAKERS

    silo = load_partition(cross_silo_partition)
    device = load_partition(cross_device_partition)
    assert len(silo["clients"]) == FIXTURE_SILOS
    assert silo["warmup"]["speakers"] == device["warmup"]["speakers"]
    assert len(device["warmup"]["speakers"]) == FIXTURE_WARMUP_SPEAKERS
    assert len(device["clients"]) >= 4
    train, valid = read_client_manifests(device, 0)
    assert Path(train[0].wav).exists() and Path(valid[0].wav).exists()
