"""Split the train manifest into a central warm-up set and federated clients.

Three modes (the reference paper's settings plus a control):

- ``cross-silo``: K silos (default 10), speaker-disjoint, balanced by hours: speakers, longest first, go into the
  silo with the fewest hours so far (speakers of equal hours keep the seeded order; equal silos: lowest index).
- ``cross-device``: one client per speaker with at least ``min_utterances`` utterances; ``clients`` caps their
  number (a seeded choice of speakers). Speakers below the minimum or over the cap are excluded and counted.
- ``iid``: the same non-warm-up utterances shuffled into K clients of equal size (speakers are shared).

Non-IID cross-silo options (off by default; the default partition is the same as in earlier versions):

- ``silo_sizes="skewed"`` (cross-silo, iid): unequal clients. Client k's target share of the hours (iid: of the
  utterances) is proportional to ``rank ** -size_exponent`` (Zipf: 1, 1/2, 1/3, ... for exponent 1), the ranks
  dealt to the clients in a seeded order; speakers go longest first into the silo furthest below its target.
  Every silo keeps at least one speaker.
- ``skew="accent"`` or ``"gender"`` (cross-silo): silos dominated by one group of speakers, a speaker's group being
  the value of the manifest's ``accents`` / ``gender`` column on most of its rows (empty: ``(none)``). Each group
  gets home silos (the largest group the largest silo, then one silo per group while silos last, the rest to
  the groups whose share of the hours is least covered); ``skew_share`` of a group's speakers (a seeded choice)
  go to its home silos, the others to silos that are not its home. With ``skew_share=1`` and at least as many
  silos as groups every silo holds one group only. Silo sizes then follow the groups' sizes.

The partition's ``stats`` and summary table show the sizes (share of the hours per silo) and, with a skew, each
silo's dominant group and its share of the silo's hours.

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
SILO_SIZES = ("equal", "skewed")
SKEWS = ("none", "accent", "gender")
SKEW_COLUMNS = {"accent": "accents", "gender": "gender"}  # option value -> manifest column
DEFAULT_SIZE_EXPONENT = 1.0
DEFAULT_SKEW_SHARE = 0.8
NO_GROUP = "(none)"  # the group of speakers whose column is empty
TABLE_MAX_CLIENTS = 30  # per-client lines of the summary table
PARTITION_VERSION = 1
PARTITION_FILE = "partition.json"
STAGE = "partition"

# Seed streams: one per random choice, so changing the mode never changes the warm-up set.
_WARMUP_STREAM, _ORDER_STREAM, _VALID_STREAM, _SIZES_STREAM, _SKEW_STREAM = 0, 1, 2, 3, 4


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
    speaker_groups: dict[str, str] | None = None  # speaker -> group label, when the silos were skewed by a group


@dataclass(frozen=True)
class NonIID:
    """The non-IID options of a partition (defaults: today's balanced, unskewed partition)."""

    silo_sizes: str = "equal"
    size_exponent: float = DEFAULT_SIZE_EXPONENT
    skew: str = "none"
    skew_share: float = DEFAULT_SKEW_SHARE

    @property
    def is_default(self) -> bool:
        return self.silo_sizes == "equal" and self.skew == "none"

    def as_dict(self) -> dict:
        return {"silo_sizes": self.silo_sizes, "size_exponent": self.size_exponent, "skew": self.skew,
                "skew_share": self.skew_share}


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


def size_shares(clients: int, exponent: float, seed: int) -> list[float]:
    """Target shares of ``clients`` unequal clients: ``rank ** -exponent`` normalised, ranks dealt in a seeded order."""
    weights = np.arange(1, clients + 1, dtype=np.float64) ** -float(exponent)
    weights = weights[_rng(seed, _SIZES_STREAM).permutation(clients)]
    return [float(w) for w in weights / weights.sum()]


def speaker_group_labels(utterances: list[Utterance], by_speaker: dict[str, list[int]], column: str) -> dict[str, str]:
    """Each speaker's group: the most frequent value of ``column`` over its rows (ties: the first in sorted order)."""
    labels = {}
    for spk, rows in by_speaker.items():
        counts = Counter(getattr(utterances[r], column).strip() or NO_GROUP for r in rows)
        labels[spk] = min(counts, key=lambda label: (-counts[label], label))
    return labels


def _home_silos(
    group_hours: dict[str, float], home_counts: dict[str, int], targets: list[float]
) -> list[str | None]:
    """The group each silo is home to (None: no group, it takes other groups' away speakers only).

    Largest silo to the largest group, then one silo per group while silos last; every further silo goes to the
    group whose share of the hours is least covered by its silos' targets. A group never gets more home silos than
    it has home speakers."""
    total = sum(group_hours.values()) or 1.0
    groups = sorted((g for g in group_hours if home_counts[g] > 0), key=lambda g: (-group_hours[g], g))
    silos = sorted(range(len(targets)), key=lambda k: (-targets[k], k))
    home: list[str | None] = [None] * len(targets)
    covered = {g: 0.0 for g in groups}
    owned = Counter()
    for k, g in zip(silos, groups):
        home[k], covered[g], owned[g] = g, targets[k], 1
    for k in silos[len(groups):]:
        open_groups = [g for g in groups if owned[g] < home_counts[g]]
        if not open_groups:
            break
        g = max(open_groups, key=lambda g: (group_hours[g] / total - covered[g], -groups.index(g)))
        home[k] = g
        covered[g] += targets[k]
        owned[g] += 1
    return home


def assign_silos(
    hours: dict[str, float],
    silos: int,
    seed: int,
    *,
    targets: list[float] | None = None,
    groups: dict[str, str] | None = None,
    skew_share: float = DEFAULT_SKEW_SHARE,
) -> list[list[str]]:
    """Speakers into ``silos`` silos of target shares ``targets`` (default: equal), skewed by ``groups``.

    Speakers, longest first (ties keep the seeded order), go into the eligible silo furthest below its target
    (lowest ``hours / target``; ties: lowest index). Without ``groups`` every silo is eligible; with them a speaker
    is a home speaker of its group (``skew_share`` of each group, a seeded choice) and goes to one of its group's
    home silos, or an away speaker and goes to a silo that is not its group's home. A silo left empty at the end
    takes a speaker from the silo with the most speakers (preferably one of its home group).
    """
    if silos > len(hours):
        raise PartitionError(
            f"clients={silos} silos but only {len(hours)} speakers are left after the warm-up set; "
            "use fewer silos or fewer warm-up speakers"
        )
    targets = targets or [1.0 / silos] * silos
    names = sorted(hours)
    seeded = [names[i] for i in _rng(seed, _ORDER_STREAM).permutation(len(names))]
    longest_first = sorted(seeded, key=lambda spk: -hours[spk])
    eligible_of: dict[str, list[int]] = {}
    home: list[str | None] = [None] * silos
    if groups is not None:
        members = {g: sorted(spk for spk in names if groups[spk] == g) for g in sorted(set(groups[s] for s in names))}
        away: set[str] = set()
        home_counts = {}
        for index, (g, speakers) in enumerate(members.items()):
            n_away = int(np.floor((1.0 - skew_share) * len(speakers) + 0.5))
            order = _rng(seed, _SKEW_STREAM, index).permutation(len(speakers))
            away.update(speakers[i] for i in order[:n_away])
            home_counts[g] = len(speakers) - n_away
        home = _home_silos({g: sum(hours[s] for s in m) for g, m in members.items()}, home_counts, targets)
        for spk in names:
            g = groups[spk]
            mine = [k for k in range(silos) if home[k] == g]
            others = [k for k in range(silos) if home[k] != g]
            eligible_of[spk] = (others if spk in away else mine) or others or list(range(silos))
    every = list(range(silos))
    load = [0.0] * silos
    members_of: list[list[str]] = [[] for _ in range(silos)]
    for spk in longest_first:
        silo = min(eligible_of.get(spk, every), key=lambda k: (load[k] / targets[k], k))
        members_of[silo].append(spk)
        load[silo] += hours[spk]
    for silo in range(silos):
        if not members_of[silo]:
            donors = [k for k in range(silos) if len(members_of[k]) > 1]
            donor = max(donors, key=lambda k: (len(members_of[k]), -k))
            pool = [s for s in members_of[donor] if groups is not None and groups[s] == home[silo]]
            moved = (pool or members_of[donor])[-1]  # the last placed: the shortest
            members_of[donor].remove(moved)
            members_of[silo].append(moved)
    return members_of


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
    non_iid: NonIID = NonIID(),
    speaker_groups: dict[str, str] | None = None,
) -> list[tuple[list[str], list[int]]]:
    """(speakers, rows) of each client before the validation split."""
    if mode == "cross-silo":
        return _silo_groups(by_speaker, durations, clients or DEFAULT_SILOS, seed, non_iid, speaker_groups)
    if mode == "cross-device":
        return _speaker_groups(by_speaker, clients, min_utterances, seed, excluded)
    return _iid_groups(by_speaker, clients or DEFAULT_SILOS, seed, non_iid)


def _silo_groups(
    by_speaker: dict[str, list[int]],
    durations: np.ndarray,
    silos: int,
    seed: int,
    non_iid: NonIID = NonIID(),
    speaker_groups: dict[str, str] | None = None,
) -> list[tuple[list[str], list[int]]]:
    hours = {spk: float(durations[rows].sum()) / 3600 for spk, rows in by_speaker.items()}
    if non_iid.is_default:
        members_of_silos = balance_silos(hours, silos, seed)  # the partition of earlier versions, exactly
    else:
        targets = size_shares(silos, non_iid.size_exponent, seed) if non_iid.silo_sizes == "skewed" else None
        members_of_silos = assign_silos(
            hours, silos, seed, targets=targets, groups=speaker_groups, skew_share=non_iid.skew_share
        )
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


def _iid_groups(
    by_speaker: dict[str, list[int]], k: int, seed: int, non_iid: NonIID = NonIID()
) -> list[tuple[list[str], list[int]]]:
    all_rows = np.array(sorted(r for rows in by_speaker.values() for r in rows), dtype=np.int64)
    if k > len(all_rows):
        raise PartitionError(
            f"clients={k} iid clients but only {len(all_rows)} utterances are left after the warm-up set"
        )
    shuffled = all_rows[_rng(seed, _ORDER_STREAM).permutation(len(all_rows))]
    speaker_of = {r: spk for spk, rows in by_speaker.items() for r in rows}
    if non_iid.silo_sizes == "skewed":
        counts = _skewed_counts(len(shuffled), size_shares(k, non_iid.size_exponent, seed))
        parts = np.split(shuffled, np.cumsum(counts)[:-1])
    else:
        parts = np.array_split(shuffled, k)
    groups = []
    for part in parts:
        rows = sorted(int(r) for r in part)
        groups.append((sorted({speaker_of[r] for r in rows}), rows))
    return groups


def _skewed_counts(total: int, shares: list[float]) -> list[int]:
    """``total`` items split by ``shares`` (largest remainders), every part at least 1 (``total >= len(shares)``)."""
    extra = total - len(shares)
    raw = [share * extra for share in shares]
    counts = [int(np.floor(x)) for x in raw]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: extra - sum(counts)]:
        counts[i] += 1
    return [c + 1 for c in counts]


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
    silo_sizes: str = "equal",
    size_exponent: float = DEFAULT_SIZE_EXPONENT,
    skew: str = "none",
    skew_share: float = DEFAULT_SKEW_SHARE,
) -> PartitionPlan:
    """Decide where every utterance goes (no I/O). Deterministic for the seed."""
    _check_options(mode, clients, min_utterances, valid_fraction)
    non_iid = check_non_iid(mode, silo_sizes, size_exponent, skew, skew_share)
    by_speaker = group_by_speaker(utterances)
    durations = np.fromiter((u.duration for u in utterances), dtype=np.float64, count=len(utterances))
    warmup = choose_warmup(list(by_speaker), warmup_speakers, seed)
    warmup_set = set(warmup)
    remaining = {spk: rows for spk, rows in by_speaker.items() if spk not in warmup_set}
    excluded: Counter = Counter()
    speaker_groups = None
    if non_iid.skew != "none":
        speaker_groups = speaker_group_labels(utterances, remaining, SKEW_COLUMNS[non_iid.skew])
        _check_groups(non_iid.skew, speaker_groups)
    groups = _client_groups(
        mode, remaining, durations, clients, min_utterances, seed, excluded, non_iid, speaker_groups
    )
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
        warmup_speakers=sorted(warmup), warmup_rows=warmup_rows, clients=plans, excluded=dict(excluded),
        speaker_groups=speaker_groups,
    )


def check_non_iid(mode: str, silo_sizes: str, size_exponent: float, skew: str, skew_share: float) -> NonIID:
    """The non-IID options, checked against each other and the mode."""
    if silo_sizes not in SILO_SIZES:
        raise PartitionError(f"silo_sizes={silo_sizes!r}: choose one of {list(SILO_SIZES)} (--silo-sizes)")
    if skew not in SKEWS:
        raise PartitionError(f"skew={skew!r}: choose one of {list(SKEWS)} (--skew)")
    if silo_sizes != "equal" and mode == "cross-device":
        raise PartitionError(
            f"silo_sizes={silo_sizes!r} applies to --mode cross-silo or iid: a cross-device partition has one client "
            "per speaker, so its sizes are the speakers'. Drop --silo-sizes or change the mode."
        )
    if skew != "none" and mode != "cross-silo":
        raise PartitionError(
            f"skew={skew!r} applies to --mode cross-silo only ({mode} clients are "
            f"{'single speakers' if mode == 'cross-device' else 'random utterances'}). Drop --skew or use "
            "--mode cross-silo."
        )
    try:
        size_exponent, skew_share = float(size_exponent), float(skew_share)
    except (TypeError, ValueError):
        raise PartitionError(
            f"size_exponent={size_exponent!r}, skew_share={skew_share!r}: both must be numbers"
        ) from None
    if not 0.0 < size_exponent <= 10.0:
        raise PartitionError(
            f"size_exponent={size_exponent}: must be in (0, 10] (1.0: shares 1, 1/2, 1/3, ...; larger: more unequal)"
        )
    if not 0.0 < skew_share <= 1.0:
        raise PartitionError(
            f"skew_share={skew_share}: must be in (0, 1], the share of each group's speakers kept in its home silos "
            "(1.0: pure silos)"
        )
    return NonIID(silo_sizes=silo_sizes, size_exponent=size_exponent, skew=skew, skew_share=skew_share)


def _check_groups(skew: str, speaker_groups: dict[str, str]) -> None:
    labels = Counter(speaker_groups.values())
    if len(labels) < 2:
        column = SKEW_COLUMNS[skew]
        value = next(iter(labels), NO_GROUP)
        raise PartitionError(
            f"skew={skew!r}: the train manifest's {column!r} column gives all {len(speaker_groups)} client speakers "
            f"the same value ({value!r}), so no silo can differ from another by {skew}. Use --skew none, or a corpus "
            f"whose TSVs fill the {column} column (`fedasr synth` corpora do; `fedasr prepare` copies it into the "
            "manifest)."
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
    if clients and "share" in clients[0]:  # a non-IID partition: sizes and group skew
        stats["share"] = describe([c["share"] for c in clients])
    if clients and "group" in clients[0]:
        stats["group_share"] = describe([c["group_share"] for c in clients])
        stats["dominant_groups"] = dict(Counter(c["group"] for c in clients).most_common())
    return stats


def _non_iid_fields(entries: list[dict], utterances: list[Utterance], plan: PartitionPlan) -> None:
    """Add each client's share of the clients' hours and, with a skew, its groups and dominant group's share."""
    total = sum(e["hours"] + e["valid_hours"] for e in entries) or 1.0
    for entry, client in zip(entries, plan.clients):
        entry["share"] = round((entry["hours"] + entry["valid_hours"]) / total, 6)
        if plan.speaker_groups is None:
            continue
        hours_of: Counter = Counter()
        for r in client.train + client.valid:
            hours_of[plan.speaker_groups[utterances[r].spk_id]] += utterances[r].duration
        speakers_of = Counter(plan.speaker_groups[spk] for spk in client.speakers)
        dominant = min(hours_of, key=lambda g: (-hours_of[g], g))
        entry["group"] = dominant
        entry["group_share"] = round(hours_of[dominant] / (sum(hours_of.values()) or 1.0), 6)
        entry["groups"] = {g: speakers_of[g] for g in sorted(speakers_of, key=lambda g: (-speakers_of[g], g))}


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
    for key in ("speakers", "utterances", "valid_utterances", "hours", "share", "group_share"):
        if key not in stats:  # share, group_share: non-IID partitions only
            continue
        row = stats[key]
        fmt = "{:>10.3f}" if key in ("hours", "share", "group_share") else "{:>10.1f}"
        lines.append(f"{key:<18}" + "".join(fmt.format(row[s]) for s in ("min", "median", "max", "mean", "std")))
    if "silo_sizes" in partition["options"]:
        lines += ["", *_non_iid_lines(partition)]
    return "\n".join(lines)


def _non_iid_lines(partition: dict) -> list[str]:
    """The sizes and group skew of a non-IID partition, one line per client (the first TABLE_MAX_CLIENTS)."""
    options, stats, clients = partition["options"], partition["stats"], partition["clients"]
    sizes = (f"skewed (Zipf exponent {options['size_exponent']:g})" if options["silo_sizes"] == "skewed"
             else "equal (balanced by hours as far as the skew allows)")
    ratio = stats.get("hours_max_min_ratio")
    lines = [f"sizes    : {sizes}; largest/smallest client hours " + (f"{ratio:.1f}" if ratio else "n/a")]
    skewed = options["skew"] != "none"
    if skewed:
        lines.append(
            f"skew     : by {options['skew']} (column {SKEW_COLUMNS[options['skew']]!r}), skew_share "
            f"{options['skew_share']:g}; dominant-group share of a client's hours: min "
            f"{stats['group_share']['min']:.2f}, median {stats['group_share']['median']:.2f}"
        )
    header = f"{'client':<8}{'speakers':>9}{'utts':>7}{'hours':>9}{'share':>7}"
    lines.append(header + ("  dominant group (share of hours; speakers per group)" if skewed else ""))
    for c in clients[:TABLE_MAX_CLIENTS]:
        line = (f"{c['id']:<8}{len(c['speakers']):>9}{c['utterances'] + c['valid_utterances']:>7}"
                f"{c['hours'] + c['valid_hours']:>9.3f}{c['share']:>7.3f}")
        if skewed:
            groups = ", ".join(f"{g} {n}" for g, n in c["groups"].items())
            line += f"  {c['group']} ({c['group_share']:.2f}; {groups})"
        lines.append(line)
    if len(clients) > TABLE_MAX_CLIENTS:
        lines.append(f"... {len(clients) - TABLE_MAX_CLIENTS} more clients in partition.json")
    return lines


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


def _write_files(out: Path, utterances: list[Utterance], plan: PartitionPlan, non_iid: bool = False) -> list[dict]:
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
    if non_iid:
        _non_iid_fields(entries, utterances, plan)
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
    silo_sizes: str = "equal",
    size_exponent: float = DEFAULT_SIZE_EXPONENT,
    skew: str = "none",
    skew_share: float = DEFAULT_SKEW_SHARE,
) -> dict:
    """Partition ``manifest_dir/train.csv`` into ``out_dir``.

    Non-IID options (module docstring): ``silo_sizes`` "equal" (default) or "skewed" (cross-silo, iid) with
    ``size_exponent``; ``skew`` "none" (default), "accent" or "gender" (cross-silo) with ``skew_share``. With any of
    them, partition.json's options, client entries (share; group, group_share, groups) and stats record the skew.

    Returns {"partition": the partition.json content, "summary_table": printable text, "seconds", "skipped"}.

    Re-running with the same inputs and options on a finished folder does nothing.

    >>> result = partition_manifest("out/manifests", "out/partitions/cross-silo", mode="cross-silo",  # doctest: +SKIP
    ...                             clients=10, warmup_speakers=117, skew="accent")
    >>> print(result["summary_table"])  # doctest: +SKIP
    """
    started = time.perf_counter()
    _check_options(mode, clients, min_utterances, valid_fraction)
    non_iid = check_non_iid(mode, silo_sizes, size_exponent, skew, skew_share)
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
    if not non_iid.is_default:  # default partitions keep the options (and fingerprint) of earlier versions
        options.update(non_iid.as_dict())
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
        min_utterances=min_utterances, valid_fraction=valid_fraction, seed=seed, **non_iid.as_dict(),
    )
    if not plan.clients:
        raise PartitionError(
            f"{source}: no client is left with data ({len(utterances)} utterances, {len(plan.warmup_speakers)} "
            f"warm-up speakers; excluded: {plan.excluded or 'none'}). Every client needs at least 2 utterances "
            "(one to train on, one to validate on): use fewer --warmup-speakers, a lower --min-utterances, or a "
            "train manifest with more speakers."
        )
    _clear_previous(out)
    entries = _write_files(out, utterances, plan, non_iid=not non_iid.is_default)
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
