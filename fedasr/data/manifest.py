"""The one place that names manifest files and reads/writes manifests.

A manifest is a SpeechBrain-style CSV (readable by ``DynamicItemDataset.from_csv``), one utterance per row:

    ID, duration, wav, spk_id, wrd, gender, age, accents

``duration`` is in seconds, ``wav`` an absolute path to the clip, ``spk_id`` the Common Voice ``client_id``,
``wrd`` the normalised transcript. ``gender``, ``age`` and ``accents`` are kept verbatim (possibly empty) for
per-group reports.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

from fedasr.utils.io import atomic_open

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Utterance:
    ID: str
    duration: float
    wav: str
    spk_id: str
    wrd: str
    gender: str = ""
    age: str = ""
    accents: str = ""


COLUMNS = tuple(f.name for f in fields(Utterance))


class ManifestError(ValueError):
    """A manifest file that cannot be read; the message names the file, the row and the fix."""


def manifest_path(folder: str | os.PathLike, split: str) -> Path:
    """``folder/<split>.csv``: the name of a split's manifest everywhere in fedasr."""
    return Path(folder) / f"{split}.csv"


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance], *, durable: bool = True) -> int:
    """Write utterances atomically; returns the number of rows written (``durable``: see ``atomic_open``)."""
    count = 0
    with atomic_open(path, "w", durable=durable, encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for utt in utterances:
            writer.writerow(
                (utt.ID, f"{float(utt.duration):.3f}", utt.wav, utt.spk_id, utt.wrd, utt.gender, utt.age, utt.accents)
            )
            count += 1
    return count


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    """Read a manifest written by :func:`write_manifest` (extra columns are ignored)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found. Run `fedasr prepare` (or `fedasr partition`) first.")
    utterances = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("ID", "duration", "wav", "spk_id", "wrd") if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(
                f"{path}: header lacks column(s) {missing}; expected {list(COLUMNS)}. "
                "Re-create it with `fedasr prepare`."
            )
        for line_no, row in enumerate(reader, start=2):
            try:
                duration = float(row["duration"])
            except (TypeError, ValueError):
                raise ManifestError(
                    f"{path}, line {line_no}: duration {row.get('duration')!r} is not a number. "
                    "Fix or delete the row, or re-create the manifest with `fedasr prepare`."
                ) from None
            utterances.append(
                Utterance(
                    ID=row["ID"],
                    duration=duration,
                    wav=row["wav"],
                    spk_id=row["spk_id"],
                    wrd=row["wrd"],
                    gender=row.get("gender") or "",
                    age=row.get("age") or "",
                    accents=row.get("accents") or "",
                )
            )
    return utterances


def spread_over_speakers(utterances: list[Utterance], count: int) -> list[Utterance]:
    """A fixed subset of ``count`` utterances drawn in turn from every speaker (each speaker's first, then each one's
    second, ...; speakers in order of first appearance), so a capped dev set covers as many speakers as it can.

    Manifests are grouped by speaker, so the first ``count`` rows would be one or two speakers: a dev WER, an
    annealing decision or a best-model choice resting on them says little about the others.
    """
    by_speaker: dict[str, list[Utterance]] = {}
    for utt in utterances:
        by_speaker.setdefault(utt.spk_id, []).append(utt)
    chosen: list[Utterance] = []
    depth = 0
    while len(chosen) < min(count, len(utterances)):
        chosen.extend(group[depth] for group in by_speaker.values() if depth < len(group))
        depth += 1
    chosen = chosen[:count]
    keep = {id(u) for u in chosen}
    return [u for u in utterances if id(u) in keep]  # manifest order: the same batches whatever the speakers
