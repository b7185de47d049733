"""Split the train manifest into a central warm-up set and federated clients.

Three modes (the reference paper's settings plus a control):

- ``cross-silo``: K silos (default 10), speaker-disjoint, balanced by hours: speakers, longest first, go into the
  silo with the fewest hours so far (speakers of equal hours keep the seeded order; equal silos: lowest index).
- ``cross-device``: one client per speaker with at least ``min_utterances`` utterances; ``clients`` caps their
  number (a seeded choice of speakers). Speakers below the minimum or over the cap are excluded and counted.
- ``iid``: the same non-warm-up utterances shuffled into K clients of equal size (speakers are shared).

The warm-up speakers depend on the seed only, so every mode of one seed shares the same warm-up set; they never
appear in a client. A partition that would leave no client with data is an error (nothing is written). Every
client keeps ``round(valid_fraction * n)`` of its own utterances (at least 1, and at
least 1 left for training) as a local validation slice; a client with a single utterance cannot have both and is
excluded (counted under ``excluded``).

Outputs in ``out_dir``: ``warmup/train.csv``, ``clients/<id>/train.csv`` and ``valid.csv`` (ids "000", "001", ...
in the order of ``partition.json``), ``stats.csv`` (one row per client) and, written last and atomically,
``partition.json`` (paths relative to its folder; :func:`load_partition` resolves them). In a client entry,
``utterances`` and ``hours`` count its training slice, ``valid_utterances`` and ``valid_hours`` its validation
slice.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import logging
import os
import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedasr.data.manifest import Utterance, manifest_path, read_manifest, write_manifest
from fedasr.utils.io import atomic_open, atomic_write_json, done_marker, is_done, mark_done, read_json
from fedasr.utils.preflight import check_writable

log = logging.getLogger(__name__)

MODES = ("cross-silo", "cross-device", "iid")
DEFAULT_SILOS = 10
PARTITION_VERSION = 1
PARTITION_FILE = "partition.json"
STAGE = "partition"

# Seed streams: one per random choice, so changing the mode never changes the warm-up set.
_WARMUP_STREAM, _ORDER_STREAM, _VALID_STREAM = 0, 1, 2


class PartitionError(ValueError):
    """Arguments or inputs that cannot be partitioned; the message says what to change."""


class PartitionNotFoundError(FileNotFoundError):
    """A manifest or partition file that does not exist; the message names it and the command that makes it."""


@dataclass
class ClientPlan:
    speakers: list[str]
    train: list[int]  # row indices into the source manifest
    valid: list[int]


@dataclass
class PartitionPlan:
    warmup_speakers: list[str]
    warmup_rows: list[int]
    clients: list[ClientPlan]
    excluded: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- planning (pure)


def group_by_speaker(utterances: list[Utterance]) -> dict[str, list[int]]:
    """Row indices of each speaker, speakers in sorted order, rows in manifest order."""
    rows: dict[str, list[int]] = {}
    for index, utt in enumerate(utterances):
        rows.setdefault(utt.spk_id, []).append(index)
    return {spk: rows[spk] for spk in sorted(rows)}


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *extra])


def choose_warmup(speakers: list[str], count: int, seed: int) -> list[str]:
    """``count`` speakers drawn by the seed alone (``speakers`` must be sorted)."""
    if count < 0:
        raise PartitionError(f"warmup_speakers={count}: must be 0 or more")
    if count >= len(speakers):
        raise PartitionError(
            f"warmup_speakers={count} but the train manifest has only {len(speakers)} speakers, so none would be "
            f"left for the clients. Use --warmup-speakers {max(0, len(speakers) // 4)} or fewer."
        )
    order = _rng(seed, _WARMUP_STREAM).permutation(len(speakers))
    return [speakers[i] for i in order[:count]]


def balance_silos(hours: dict[str, float], silos: int, seed: int) -> list[list[str]]:
    """Greedy longest-first assignment of speakers to the silo with the fewest hours."""
    if silos > len(hours):
        raise PartitionError(
            f"clients={silos} silos but only {len(hours)} speakers are left after the warm-up set; "
            "use fewer silos or fewer warm-up speakers"
        )
    names = sorted(hours)
    seeded = [names[i] for i in _rng(seed, _ORDER_STREAM).permutation(len(names))]
    longest_first = sorted(seeded, key=lambda spk: -hours[spk])  # stable: ties keep the seeded order
    heap = [(0.0, silo) for silo in range(silos)]
    members: list[list[str]] = [[] for _ in range(silos)]
    for spk in longest_first:
        load, silo = heapq.heappop(heap)
        members[silo].append(spk)
        heapq.heappush(heap, (load + hours[spk], silo))
    return members


def split_valid(rows: list[int], valid_fraction: float, seed: int, client_index: int) -> tuple[list[int], list[int]]:
    """(train, valid) rows of one client: a seeded ``round(valid_fraction * n)``, at least 1 each side."""
    n_valid = min(max(1, round(valid_fraction * len(rows))), len(rows) - 1)
    order = _rng(seed, _VALID_STREAM, client_index).permutation(len(rows))
    valid = sorted(rows[i] for i in order[:n_valid])
    train = sorted(rows[i] for i in order[n_valid:])
    return train, valid


def _client_groups(
    mode: str,
    by_speaker: dict[str, list[int]],
    durations: np.ndarray,
    clients: int | None,
    min_utterances: int,
    seed: int,
    excluded: Counter,
) -> list[tuple[list[str], list[int]]]:
    """(speakers, rows) of each client before the validation split."""
    if mode == "cross-silo":
        return _silo_groups(by_speaker, durations, clients or DEFAULT_SILOS, seed)
    if mode == "cross-device":
        return _speaker_groups(by_speaker, clients, min_utterances, seed, excluded)
    return _iid_groups(by_speaker, clients or DEFAULT_SILOS, seed)


def _silo_groups(
    by_speaker: dict[str, list[int]], durations: np.ndarray, silos: int, seed: int
) -> list[tuple[list[str], list[int]]]:
    hours = {spk: float(durations[rows].sum()) / 3600 for spk, rows in by_speaker.items()}
    members_of_silos = balance_silos(hours, silos, seed)
    return [(sorted(members), sorted(r for spk in members for r in by_speaker[spk])) for members in members_of_silos]


def _speaker_groups(
    by_speaker: dict[str, list[int]], cap: int | None, min_utterances: int, seed: int, excluded: Counter
) -> list[tuple[list[str], list[int]]]:
    names = list(by_speaker)
    seeded = [names[i] for i in _rng(seed, _ORDER_STREAM).permutation(len(names))]
    eligible = [spk for spk in seeded if len(by_speaker[spk]) >= min_utterances]
    _count(excluded, "below_min_utterances", [s for s in seeded if len(by_speaker[s]) < min_utterances], by_speaker)
    if cap is not None and len(eligible) > cap:
        _count(excluded, "over_client_cap", eligible[cap:], by_speaker)
        eligible = eligible[:cap]
    return [([spk], list(by_speaker[spk])) for spk in eligible]


def _iid_groups(by_speaker: dict[str, list[int]], k: int, seed: int) -> list[tuple[list[str], list[int]]]:
    all_rows = np.array(sorted(r for rows in by_speaker.values() for r in rows), dtype=np.int64)
    if k > len(all_rows):
        raise PartitionError(
            f"clients={k} iid clients but only {len(all_rows)} utterances are left after the warm-up set"
        )
    shuffled = all_rows[_rng(seed, _ORDER_STREAM).permutation(len(all_rows))]
    speaker_of = {r: spk for spk, rows in by_speaker.items() for r in rows}
    groups = []
    for part in np.array_split(shuffled, k):
        rows = sorted(int(r) for r in part)
        groups.append((sorted({speaker_of[r] for r in rows}), rows))
    return groups


def _count(excluded: Counter, reason: str, speakers: list[str], by_speaker: dict[str, list[int]]) -> None:
    if speakers:
        excluded[f"{reason}_speakers"] += len(speakers)
        excluded[f"{reason}_utterances"] += sum(len(by_speaker[s]) for s in speakers)


def plan_partition(
    utterances: list[Utterance],
    *,
    mode: str,
    clients: int | None = None,
    warmup_speakers: int = 117,
    min_utterances: int = 2,
    valid_fraction: float = 0.1,
    seed: int = 0,
) -> PartitionPlan:
    """Decide where every utterance goes (no I/O). Deterministic for the seed."""
    _check_options(mode, clients, min_utterances, valid_fraction)
    by_speaker = group_by_speaker(utterances)
    durations = np.fromiter((u.duration for u in utterances), dtype=np.float64, count=len(utterances))
    warmup = choose_warmup(list(by_speaker), warmup_speakers, seed)
    warmup_set = set(warmup)
    remaining = {spk: rows for spk, rows in by_speaker.items() if spk not in warmup_set}
    excluded: Counter = Counter()
    groups = _client_groups(mode, remaining, durations, clients, min_utterances, seed, excluded)
    plans = []
    for speakers, rows in groups:
        if len(rows) < 2:
            # A client needs one utterance to train on and one to validate on (its local WER for the server).
            excluded["single_utterance_clients"] += 1
            excluded["single_utterance_client_utterances"] += len(rows)
            continue
        train, valid = split_valid(rows, valid_fraction, seed, len(plans))
        plans.append(ClientPlan(speakers=speakers, train=train, valid=valid))
    warmup_rows = sorted(r for spk in warmup for r in by_speaker[spk])
    return PartitionPlan(
        warmup_speakers=sorted(warmup), warmup_rows=warmup_rows, clients=plans, excluded=dict(excluded)
    )


def _check_options(mode: str, clients: int | None, min_utterances: int, valid_fraction: float) -> None:
    if mode not in MODES:
        raise PartitionError(f"mode={mode!r}: choose one of {list(MODES)}")
    if clients is not None and clients < 1:
        raise PartitionError(f"clients={clients}: must be at least 1 (or leave it unset)")
    if min_utterances < 1:
        raise PartitionError(f"min_utterances={min_utterances}: must be at least 1")
    if not 0.0 <= valid_fraction < 1.0:
        raise PartitionError(f"valid_fraction={valid_fraction}: must be in [0, 1)")


# ---------------------------------------------------------------------------------------------- statistics


def describe(values: list[float]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "max": 0, "mean": 0, "std": 0}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
    }


def partition_stats(clients: list[dict]) -> dict:
    hours = [c["hours"] for c in clients]
    stats = {
        "clients": len(clients),
        "speakers": describe([len(c["speakers"]) for c in clients]),
        "utterances": describe([c["utterances"] for c in clients]),
        "valid_utterances": describe([c["valid_utterances"] for c in clients]),
        "hours": describe(hours),
        "total_train_utterances": sum(c["utterances"] for c in clients),
        "total_valid_utterances": sum(c["valid_utterances"] for c in clients),
        "total_hours": sum(hours) + sum(c["valid_hours"] for c in clients),
    }
    stats["hours_max_min_ratio"] = (max(hours) / min(hours)) if hours and min(hours) > 0 else None
    return stats


def summary_table(partition: dict) -> str:
    """A printable text summary of a partition."""
    warm, stats, excluded = partition["warmup"], partition["stats"], partition["excluded"]
    lines = [
        f"partition: mode {partition['mode']}, seed {partition['seed']}, source {partition['source']}",
        f"warm-up  : {len(warm['speakers'])} speakers, {warm['utterances']} utterances, {warm['hours']:.3f} h",
        f"clients  : {stats['clients']} ({stats['total_train_utterances']} train + "
        f"{stats['total_valid_utterances']} local-valid utterances, {stats['total_hours']:.3f} h)",
        "excluded : " + (", ".join(f"{k} {v}" for k, v in excluded.items()) or "none"),
        "",
        f"{'per client':<18}{'min':>10}{'median':>10}{'max':>10}{'mean':>10}{'std':>10}",
    ]
    for key in ("speakers", "utterances", "valid_utterances", "hours"):
        row = stats[key]
        fmt = "{:>10.3f}" if key == "hours" else "{:>10.1f}"
        lines.append(f"{key:<18}" + "".join(fmt.format(row[s]) for s in ("min", "median", "max", "mean", "std")))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- files


def client_id(position: int) -> str:
    return f"{position:03d}"


def _source_fingerprint(source: Path) -> dict:
    """Identity of the source manifest: its content hash (cheap next to reading it)."""
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(source), "sha256": digest.hexdigest()}


def _hours(utterances: list[Utterance], rows: list[int]) -> float:
    return round(sum(utterances[r].duration for r in rows) / 3600, 6)


def _write_rows(path: Path, utterances: list[Utterance], rows: list[int]) -> int:
    # Not fsynced one by one (thousands of cross-device clients): partition.json, written last and durably,
    # is what commits the folder; a run stopped before it is redone.
    return write_manifest(path, (utterances[r] for r in rows), durable=False)


def _write_files(out: Path, utterances: list[Utterance], plan: PartitionPlan) -> list[dict]:
    """Write the warm-up and per-client manifests and stats.csv; returns the client entries of partition.json."""
    _write_rows(manifest_path(out / "warmup", "train"), utterances, plan.warmup_rows)
    entries = []
    for position, client in enumerate(plan.clients):
        for split, rows in (("train", client.train), ("valid", client.valid)):
            _write_rows(manifest_path(out / "clients" / client_id(position), split), utterances, rows)
    for position, client in enumerate(plan.clients):
        cid = client_id(position)
        entries.append(
            {
                "id": cid,
                "speakers": client.speakers,
                "train": f"clients/{cid}/train.csv",
                "valid": f"clients/{cid}/valid.csv",
                "utterances": len(client.train),
                "valid_utterances": len(client.valid),
                "hours": _hours(utterances, client.train),
                "valid_hours": _hours(utterances, client.valid),
            }
        )
    with atomic_open(out / "stats.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "speakers", "utterances", "valid_utterances", "hours", "valid_hours"])
        for e in entries:
            writer.writerow(
                [e["id"], len(e["speakers"]), e["utterances"], e["valid_utterances"], e["hours"], e["valid_hours"]]
            )
    return entries


def partition_manifest(
    manifest_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    mode: str,
    clients: int | None = None,
    warmup_speakers: int = 117,
    min_utterances: int = 2,
    valid_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """Partition ``manifest_dir/train.csv`` into ``out_dir``.

    Returns {"partition": the partition.json content, "summary_table": printable text, "seconds", "skipped"}.

    Re-running with the same inputs and options on a finished folder does nothing.
    """
    started = time.perf_counter()
    _check_options(mode, clients, min_utterances, valid_fraction)
    source = manifest_path(manifest_dir, "train").resolve()
    if not source.exists():
        raise PartitionNotFoundError(f"{source}: train manifest not found. Run `fedasr prepare` to create it first.")
    out = Path(out_dir)
    options = {
        "clients": clients,
        "warmup_speakers": warmup_speakers,
        "min_utterances": min_utterances,
        "valid_fraction": valid_fraction,
    }
    fingerprint = {
        "version": PARTITION_VERSION, "mode": mode, "seed": seed, "options": options,
        "source": _source_fingerprint(source),
    }
    if is_done(out, STAGE, fingerprint) and (out / PARTITION_FILE).exists():
        partition = read_json(out / PARTITION_FILE)
        log.info("%s already holds this partition; nothing to do", out)
        return _result(partition, started, skipped=True)

    check_writable(out, 4 * source.stat().st_size, what="partition folder")  # before any work
    utterances = read_manifest(source)
    if not utterances:
        raise PartitionError(f"{source}: the train manifest has no rows. Re-create it with `fedasr prepare`.")
    plan = plan_partition(
        utterances, mode=mode, clients=clients, warmup_speakers=warmup_speakers,
        min_utterances=min_utterances, valid_fraction=valid_fraction, seed=seed,
    )
    if not plan.clients:
        raise PartitionError(
            f"{source}: no client is left with data ({len(utterances)} utterances, {len(plan.warmup_speakers)} "
            f"warm-up speakers; excluded: {plan.excluded or 'none'}). Every client needs at least 2 utterances "
            "(one to train on, one to validate on): use fewer --warmup-speakers, a lower --min-utterances, or a "
            "train manifest with more speakers."
        )
    _clear_previous(out)
    entries = _write_files(out, utterances, plan)
    partition = {
        "version": PARTITION_VERSION,
        "mode": mode,
        "seed": seed,
        "source": str(source),
        "options": options,
        "warmup": {
            "speakers": plan.warmup_speakers,
            "train": "warmup/train.csv",
            "utterances": len(plan.warmup_rows),
            "hours": _hours(utterances, plan.warmup_rows),
        },
        "clients": entries,
        "excluded": plan.excluded,
        "stats": partition_stats(entries),
    }
    atomic_write_json(out / PARTITION_FILE, partition)
    mark_done(out, STAGE, fingerprint)
    return _result(partition, started, skipped=False)


def _clear_previous(out: Path) -> None:
    """Remove an older partition in ``out`` (its json first, so no json ever points at mixed files)."""
    for stale in (done_marker(out, STAGE), out / PARTITION_FILE):
        stale.unlink(missing_ok=True)
    shutil.rmtree(out / "clients", ignore_errors=True)


def _result(partition: dict, started: float, *, skipped: bool) -> dict:
    return {
        "partition": partition,
        "summary_table": summary_table(partition),
        "seconds": round(time.perf_counter() - started, 3),
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------------------------- loading


REQUIRED_KEYS = ("version", "mode", "seed", "source", "warmup", "clients", "excluded", "stats")


def load_partition(path: str | os.PathLike) -> dict:
    """Read ``partition.json`` (or the folder holding it), validate it, and make its paths absolute.

    Reads no manifest: a federated client then reads only its own files (see :func:`read_client_manifests`).
    """
    path = Path(path)
    json_path = path / PARTITION_FILE if path.is_dir() else path
    if not json_path.exists():
        raise PartitionNotFoundError(f"{json_path}: partition file not found. Run `fedasr partition` to create it.")
    try:
        partition = read_json(json_path)
    except (OSError, ValueError) as err:
        raise PartitionError(
            f"{json_path}: not a readable partition file ({err}). Re-create it with `fedasr partition`."
        ) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(partition, dict) or k not in partition]
    if missing:
        raise PartitionError(f"{json_path}: missing key(s) {missing}. Re-create it with `fedasr partition`.")
    if partition["version"] != PARTITION_VERSION:
        raise PartitionError(
            f"{json_path}: version {partition['version']!r}, this fedasr reads version {PARTITION_VERSION}. "
            "Re-create it with `fedasr partition`."
        )
    base = json_path.parent.resolve()
    partition["warmup"]["train"] = str(base / partition["warmup"]["train"])
    for position, client in enumerate(partition["clients"]):
        for key in ("id", "train", "valid"):
            if key not in client:
                raise PartitionError(
                    f"{json_path}: client #{position} lacks {key!r}. Re-create it with `fedasr partition`."
                )
        client["train"] = str(base / client["train"])
        client["valid"] = str(base / client["valid"])
    partition["path"] = str(json_path.resolve())
    return partition


def read_client_manifests(
    partition: dict | str | os.PathLike, client: int | str
) -> tuple[list[Utterance], list[Utterance]]:
    """(train, valid) utterances of one client, by position (Flower's partition-id) or id ("007").

    Reads only that client's two manifests.
    """
    part = partition if isinstance(partition, dict) else load_partition(partition)
    entries = part["clients"]
    if isinstance(client, int):
        if not 0 <= client < len(entries):
            raise PartitionError(
                f"{part.get('path', 'partition')}: client {client} out of range: it has {len(entries)} clients "
                "(check num-partitions / num-supernodes)"
            )
        entry = entries[client]
    else:
        matches = [e for e in entries if e["id"] == client]
        if not matches:
            raise PartitionError(f"{part.get('path', 'partition')}: no client with id {client!r}")
        entry = matches[0]
    return read_manifest(entry["train"]), read_manifest(entry["valid"])
