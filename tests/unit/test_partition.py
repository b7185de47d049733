"""Partitioning invariants on generated manifests (no audio), plus one check on the real fixture corpus."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedasr.cli import main as cli_main
from fedasr.data.manifest import Utterance, manifest_path, read_manifest, write_manifest
from fedasr.data.partition import (
    PartitionError,
    PartitionNotFoundError,
    assign_silos,
    balance_silos,
    load_partition,
    partition_manifest,
    plan_partition,
    read_client_manifests,
    size_shares,
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


# ---------------------------------------------------------------------------------------------- non-IID silos

ACCENTS = ("fr-fr", "fr-fr", "fr-fr", "fr-be", "fr-ch")  # speaker s has ACCENTS[s % 5]: 60 / 20 / 20 %


def make_grouped_utterances(n_speakers: int, seed: int = 0) -> list[Utterance]:
    """make_utterances with an accent (60/20/20 %) and a gender (alternating) per speaker."""
    return [
        replace(u, accents=ACCENTS[int(u.spk_id, 16) % 5],
                gender=("male_masculine", "female_feminine")[int(u.spk_id, 16) % 2])
        for u in make_utterances(n_speakers, seed=seed)
    ]


@pytest.fixture(scope="module")
def grouped_manifest_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grouped")
    write_manifest(manifest_path(folder, "train"), make_grouped_utterances(200, seed=2))
    return folder


def speaker_numbers(client) -> list[int]:
    return [int(spk, 16) for spk in client.speakers]


def test_default_options_keep_the_partition_of_earlier_versions(tmp_path):
    # plan_partition(make_utterances(80, seed=4), mode="cross-silo", clients=5, warmup_speakers=6, seed=3) before
    # the non-IID options existed.
    utterances = make_utterances(80, seed=4)
    plan = plan_partition(utterances, mode="cross-silo", clients=5, warmup_speakers=6, seed=3,
                          silo_sizes="equal", skew="none")
    assert [speaker_numbers(c) for c in plan.clients] == [
        [1, 4, 15, 17, 19, 22, 25, 26, 28, 36, 38, 39, 59, 66, 74],
        [3, 7, 20, 32, 41, 42, 46, 48, 50, 52, 53, 61, 67, 76, 79],
        [6, 10, 12, 27, 29, 45, 57, 60, 64, 69, 70, 71, 75, 77],
        [5, 13, 24, 30, 33, 37, 40, 43, 44, 51, 54, 56, 72, 73, 78],
        [2, 8, 9, 11, 14, 16, 18, 21, 31, 47, 55, 58, 62, 65, 68],
    ]
    assert [len(c.train) for c in plan.clients] == [155, 154, 159, 157, 150]
    assert sorted(int(s, 16) for s in plan.warmup_speakers) == [0, 23, 34, 35, 49, 63]
    iid = plan_partition(utterances, mode="iid", clients=5, warmup_speakers=6, seed=3, silo_sizes="equal")
    assert [len(c.train) + len(c.valid) for c in iid.clients] == [173, 172, 172, 172, 172]
    # partition.json gains no key: the files of earlier versions stay byte-identical.
    write_manifest(manifest_path(tmp_path / "m", "train"), utterances)
    partition = partition_manifest(tmp_path / "m", tmp_path / "p", mode="cross-silo", clients=5, warmup_speakers=6,
                                   seed=3, silo_sizes="equal", skew="none")["partition"]
    assert sorted(partition["options"]) == ["clients", "min_utterances", "valid_fraction", "warmup_speakers"]
    assert sorted(partition["clients"][0]) == ["hours", "id", "speakers", "train", "utterances", "valid",
                                               "valid_hours", "valid_utterances"]
    assert "share" not in partition["stats"] and "sizes" not in partition_manifest(
        tmp_path / "m", tmp_path / "p", mode="cross-silo", clients=5, warmup_speakers=6, seed=3)["summary_table"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skewed_silo_sizes_are_unequal_and_no_silo_is_empty(seed):
    utterances = make_utterances(300, seed=seed)
    plan = plan_partition(utterances, mode="cross-silo", clients=6, warmup_speakers=20, seed=seed,
                          silo_sizes="skewed")
    hours = sorted(sum(utterances[r].duration for r in c.train + c.valid) for c in plan.clients)
    assert len(hours) == 6 and all(c.speakers for c in plan.clients)
    assert hours[-1] / hours[0] > 4, "Zipf shares 1 .. 1/6: the largest silo about 6 times the smallest"
    # Shares close to the Zipf targets: the largest silo holds about 1 / (1 + 1/2 + ... + 1/6) = 41 % of the hours.
    assert 0.36 < hours[-1] / sum(hours) < 0.46
    placed = sorted(spk for c in plan.clients for spk in c.speakers)
    assert len(placed) == len(set(placed)) == 280
    # Few speakers and a steep exponent: every silo still keeps one speaker.
    few = make_utterances(12, seed=seed, min_utts=3)
    tight = plan_partition(few, mode="cross-silo", clients=10, warmup_speakers=2, seed=seed, silo_sizes="skewed",
                           size_exponent=3.0)
    assert len(tight.clients) == 10 and all(len(c.speakers) == 1 for c in tight.clients)


def test_assign_silos_never_leaves_a_silo_empty():
    for seed in range(40):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(3, 12))
        hours = {f"s{i}": float(rng.choice([0.5, 1.0, 5.0, 20.0])) for i in range(n)}
        groups = {spk: str(rng.choice(["x", "y", "z"], p=[0.6, 0.3, 0.1])) for spk in hours}
        silos = int(rng.integers(1, n + 1))
        for targets in (None, size_shares(silos, 2.0, seed)):
            for skew in (None, groups):
                members = assign_silos(hours, silos, seed, targets=targets, groups=skew,
                                       skew_share=float(rng.choice([0.3, 0.5, 0.8, 1.0])))
                assert all(members) and sorted(s for m in members for s in m) == sorted(hours), (seed, members)


def test_skewed_iid_clients_are_unequal():
    utterances = make_utterances(100, seed=3)
    plan = plan_partition(utterances, mode="iid", clients=4, warmup_speakers=10, seed=0, silo_sizes="skewed")
    sizes = sorted(len(c.train) + len(c.valid) for c in plan.clients)
    assert sizes[-1] / sizes[0] > 3 and sizes[0] >= 2
    rows = [r for c in plan.clients for r in c.train + c.valid]
    assert len(rows) == len(set(rows)) == len(utterances) - len(plan.warmup_rows)


@pytest.mark.parametrize("skew_share, floor", [(0.8, 0.6), (1.0, 1.0)])
def test_accent_skew_puts_most_of_each_silo_in_one_group(skew_share, floor):
    utterances = make_grouped_utterances(300, seed=1)
    accent_of = {u.spk_id: u.accents for u in utterances}
    plan = plan_partition(utterances, mode="cross-silo", clients=5, warmup_speakers=20, seed=0, skew="accent",
                          skew_share=skew_share)
    dominant = []
    for client in plan.clients:
        counts = Counter(accent_of[spk] for spk in client.speakers)
        group, count = counts.most_common(1)[0]
        assert count / len(client.speakers) >= floor, (counts, skew_share)
        dominant.append(group)
    # fr-fr (60 % of the speakers) dominates 3 of the 5 silos, fr-be and fr-ch one each.
    assert Counter(dominant) == {"fr-fr": 3, "fr-be": 1, "fr-ch": 1}
    placed = [spk for c in plan.clients for spk in c.speakers]
    assert len(placed) == len(set(placed)) == 280
    assert plan.speaker_groups == {spk: accent_of[spk] for spk in placed}
    # Without the skew the same silos mix the accents: fr-be never dominates.
    mixed = plan_partition(utterances, mode="cross-silo", clients=5, warmup_speakers=20, seed=0)
    assert all(Counter(accent_of[s] for s in c.speakers).most_common(1)[0][0] == "fr-fr" for c in mixed.clients)


def test_gender_skew_with_skewed_sizes_shows_in_the_partition_and_summary(grouped_manifest_dir, tmp_path):
    result = run(grouped_manifest_dir, tmp_path, mode="cross-silo", clients=4, skew="gender", silo_sizes="skewed")
    partition = json.loads((tmp_path / "partition.json").read_text())
    assert partition == result["partition"]
    assert partition["options"]["skew"] == "gender" and partition["options"]["silo_sizes"] == "skewed"
    clients = partition["clients"]
    assert len(clients) == 4 and all(c["speakers"] for c in clients)
    assert {c["group"] for c in clients} == {"male_masculine", "female_feminine"}
    assert all(c["group_share"] > 0.5 for c in clients)
    assert abs(sum(c["share"] for c in clients) - 1) < 1e-3 and max(c["share"] for c in clients) > 0.35
    for c in clients:
        assert sum(c["groups"].values()) == len(c["speakers"])
    stats = partition["stats"]
    assert stats["group_share"]["min"] == min(c["group_share"] for c in clients)
    assert sum(stats["dominant_groups"].values()) == 4
    table = result["summary_table"]
    assert "skew     : by gender (column 'gender')" in table and "dominant group" in table
    assert "sizes    : skewed (Zipf exponent 1)" in table
    for c in clients:
        assert f"{c['group']} ({c['group_share']:.2f};" in table
    # The options are part of the fingerprint: the same folder with the skew dropped is redone.
    again = run(grouped_manifest_dir, tmp_path, mode="cross-silo", clients=4)
    assert not again["skipped"] and "skew" not in again["partition"]["options"]


def test_non_iid_options_are_checked(grouped_manifest_dir, manifest_dir, tmp_path):
    cases = [
        ({"mode": "cross-device", "silo_sizes": "skewed"}, r"silo_sizes='skewed' applies to --mode cross-silo or iid"),
        ({"mode": "iid", "skew": "accent"}, r"skew='accent' applies to --mode cross-silo only"),
        ({"mode": "cross-silo", "silo_sizes": "zipf"}, r"silo_sizes='zipf': choose one of \['equal', 'skewed'\]"),
        ({"mode": "cross-silo", "skew": "age"}, r"skew='age': choose one of \['none', 'accent', 'gender'\]"),
        ({"mode": "cross-silo", "silo_sizes": "skewed", "size_exponent": 0},
         r"size_exponent=0.0: must be in \(0, 10\]"),
        ({"mode": "cross-silo", "skew": "gender", "skew_share": 1.5}, r"skew_share=1.5: must be in \(0, 1\]"),
    ]
    for options, message in cases:
        with pytest.raises(PartitionError, match=message):
            run(grouped_manifest_dir, tmp_path, **options)
    # A manifest without accents cannot be skewed by accent.
    with pytest.raises(PartitionError, match=r"'accents' column gives all 280 client speakers the same value"):
        run(manifest_dir, tmp_path, mode="cross-silo", skew="accent")
    assert not (tmp_path / "partition.json").exists()


def test_cli_non_iid_options(grouped_manifest_dir, tmp_path, capsys):
    argv = ["partition", str(grouped_manifest_dir), str(tmp_path), "--mode", "cross-silo", "--clients", "5",
            "--warmup-speakers", "20", "--skew", "accent", "--skew-share", "1", "--silo-sizes", "skewed",
            "--size-exponent", "0.5"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "skew     : by accent" in out and "Zipf exponent 0.5" in out
    options = load_partition(tmp_path)["options"]
    assert (options["skew"], options["skew_share"], options["silo_sizes"], options["size_exponent"]) == (
        "accent", 1.0, "skewed", 0.5)
    assert cli_main(["partition", str(grouped_manifest_dir), str(tmp_path), "--mode", "iid", "--skew", "gender"]) == 2
    assert "skew='gender' applies to --mode cross-silo only" in capsys.readouterr().err
