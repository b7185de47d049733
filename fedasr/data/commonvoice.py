"""Common Voice release folder -> train/dev/test manifests (+ prepare_report.json and skipped.tsv).

Works on every release layout: columns are found by header name (old releases have ``accent``, new ones
``accents``, ``variant``, ``sentence_id``, ``sentence_domain``, ``segment``...). TSVs are split on tabs with no
quote processing, so sentences containing ``"`` survive intact.

Rows flow through in a stream: the main process reads the TSV and sends chunks of rows to a process pool that
normalises the sentence and reads the clip's audio header (``soundfile.info``: frames / samplerate, no decode);
results come back in TSV order and are written straight to the manifest.

Each skipped row gets the first reason that applies, checked in this order:
``malformed_row`` (wrong number of fields), ``undecodable_row`` (not UTF-8), ``empty_transcript`` (nothing
left after normalisation), ``wrong_script`` (letters outside the language's script, e.g. Cyrillic in a French
release), ``contains_digits``, ``too_few_words``, ``too_many_words``, ``missing_clip``, ``empty_clip`` (0 bytes),
``unreadable_clip`` (not decodable audio), ``truncated_clip`` (an mp3 shorter than its own header says: a
partial download; its header duration would be wrong and its audio would miss the end of the sentence),
``too_short``, ``too_long``, and last ``duplicate_clip`` (a row that passed everything but whose clip is already
in this split's manifest). Every skipped row is named in ``out_dir/skipped.tsv`` (split, line, clip, reason) and
counted in the report.

Clips that are not 48 kHz mono (Common Voice's format) are kept: training down-mixes and resamples them when it
loads them (fedasr.models.dataio). The report counts the audio formats of the kept clips per split
(``audio_formats``, e.g. ``{"48000 Hz, 1 ch": 950, "16000 Hz, 2 ch": 3}``) and logs a warning when some differ.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import soundfile

from fedasr.data.manifest import Utterance, manifest_path, write_manifest
from fedasr.data.normalize import Normalizer, contains_digits, get_normalizer
from fedasr.utils.io import atomic_open, atomic_write_json, done_marker, is_done, mark_done, read_json
from fedasr.utils.preflight import check_writable

logger = logging.getLogger(__name__)

STAGE = "prepare_commonvoice"
FORMAT_VERSION = 2  # bump when the output of the same inputs and options changes
REPORT_NAME = "prepare_report.json"
SKIPPED_LOG_NAME = "skipped.tsv"
REQUIRED_COLUMNS = ("client_id", "path", "sentence")
ACCENT_COLUMNS = ("accents", "accent")  # new releases, old releases
CHUNK_ROWS = 1000  # rows sent to a worker at a time
TSV_BYTES_PER_ROW = 150  # a rough size of a Common Voice TSV row, to estimate a corpus' size
MAX_LOGGED_MALFORMED = 20  # per TSV; all of them are in skipped.tsv anyway
COMMON_VOICE_FORMAT = "48000 Hz, 1 ch"
MP3_TRUNCATION_TOLERANCE = 0.99  # a complete mp3 is at least as long as its Xing/Info header's byte count

SKIP_REASONS = (
    "malformed_row",
    "undecodable_row",
    "empty_transcript",
    "wrong_script",
    "contains_digits",
    "too_few_words",
    "too_many_words",
    "missing_clip",
    "empty_clip",
    "unreadable_clip",
    "truncated_clip",
    "too_short",
    "too_long",
    "duplicate_clip",
)


class CommonVoiceFormatError(ValueError):
    """A Common Voice TSV that cannot be read; the message names the file, what is wrong and the fix."""


class CommonVoiceNotFoundError(FileNotFoundError):
    """The Common Voice folder, its clips/ folder or a split's TSV is missing."""


@dataclass(frozen=True)
class RowFilters:
    """Options deciding which rows are kept (they travel to the worker processes)."""

    min_duration: float = 0.0
    max_duration: float | None = None
    min_words: int = 1
    max_words: int | None = None
    keep_digits: bool = False


@dataclass(frozen=True)
class TsvLayout:
    """Where the columns fedasr uses sit in one TSV (found by header name)."""

    n_fields: int
    client_id: int
    path: int
    sentence: int
    gender: int | None
    age: int | None
    accents: int | None


# A row as sent to a worker: (line number, client_id, clip path, sentence, gender, age, accents).
RawRow = tuple[int, str, str, str, str, str, str]
# A worker's answer: (line number, clip name, skip reason or None, Utterance or None, audio format or "").
RowResult = tuple[int, str, "str | None", "Utterance | None", str]


# ---------------------------------------------------------------- reading TSVs


def parse_header(header_line: str, tsv_path: Path) -> TsvLayout:
    """Locate the needed columns by name; a missing required column is a :class:`CommonVoiceFormatError`."""
    names = [name.strip() for name in header_line.lstrip("\ufeff").rstrip("\r\n").split("\t")]
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise CommonVoiceFormatError(
            f"{tsv_path}, line 1: header lacks required column(s) {missing}; columns found: {names}. "
            f"A Common Voice TSV needs {list(REQUIRED_COLUMNS)} in its first line: pass the folder of one "
            "locale of an unmodified Common Voice release."
        )

    def optional(*candidates: str) -> int | None:
        return next((names.index(c) for c in candidates if c in names), None)

    return TsvLayout(
        n_fields=len(names),
        client_id=names.index("client_id"),
        path=names.index("path"),
        sentence=names.index("sentence"),
        gender=optional("gender"),
        age=optional("age"),
        accents=optional(*ACCENT_COLUMNS),
    )


def read_layout(tsv_path: Path) -> TsvLayout:
    """The column layout of a TSV, from its header line."""
    with open(tsv_path, "rb") as handle:
        header = handle.readline()
    if not header.strip():
        raise CommonVoiceFormatError(f"{tsv_path}: the file is empty (no header line). Re-extract the release.")
    return parse_header(header.decode("utf-8", errors="replace"), tsv_path)


def _field(fields: list[str], index: int | None) -> str:
    return fields[index] if index is not None else ""


def iter_tsv_rows(tsv_path: Path, skipped: deque) -> Iterator[RawRow]:
    """Yield the rows of a Common Voice TSV; rows that cannot be parsed go to ``skipped`` (line, clip, reason).

    Fields are split on tabs only (no quote processing). Blank lines are ignored.
    """
    layout = read_layout(tsv_path)
    with open(tsv_path, "rb") as handle:
        handle.readline()  # header
        logged = 0
        for line_no, raw in enumerate(handle, start=2):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                fields = raw.decode("utf-8").split("\t")
            except UnicodeDecodeError:
                skipped.append((line_no, "", "undecodable_row"))
                continue
            if len(fields) != layout.n_fields:
                clip = fields[layout.path] if len(fields) > layout.path else ""
                skipped.append((line_no, clip, "malformed_row"))
                if logged < MAX_LOGGED_MALFORMED:
                    logger.warning(
                        "%s:%d: %d fields instead of %d; row skipped (malformed_row)",
                        tsv_path, line_no, len(fields), layout.n_fields,
                    )
                logged += 1
                continue
            yield (
                line_no,
                fields[layout.client_id],
                fields[layout.path],
                fields[layout.sentence],
                _field(fields, layout.gender),
                _field(fields, layout.age),
                _field(fields, layout.accents),
            )


# ---------------------------------------------------------------- per-row work (runs in worker processes)


def resolve_clip(clips_dir: str, clip: str) -> str:
    """The clip's path; very old releases list clips without their ``.mp3`` extension."""
    path = os.path.join(clips_dir, clip)
    if not os.path.splitext(clip)[1] and not os.path.exists(path) and os.path.exists(path + ".mp3"):
        return path + ".mp3"
    return path


def read_duration(path: str) -> tuple[float | None, str | None, str]:
    """(duration in seconds, None, audio format) from the audio header, or (None, reason, "") for a missing,
    empty, corrupt or truncated clip. The format reads like "48000 Hz, 1 ch"."""
    try:
        # What soundfile.info reads, without its extra format strings and log text (~25 % faster).
        with soundfile.SoundFile(path) as audio:
            frames, samplerate, channels, container = audio.frames, audio.samplerate, audio.channels, audio.format
    except Exception:  # libsndfile raises several types for missing or corrupt files: find out which
        return None, _unreadable_reason(path), ""
    if samplerate <= 0 or frames <= 0:
        return None, "unreadable_clip", ""
    if container == "MP3" and mp3_is_truncated(path):
        return None, "truncated_clip", ""
    return frames / samplerate, None, f"{samplerate} Hz, {channels} ch"


def mp3_is_truncated(path: str) -> bool:
    """True when the file is shorter than the stream size in its Xing/Info header (written by LAME, ffmpeg...).

    The header is also where the duration comes from, so a partial download would otherwise pass with the full
    clip's duration. Reads only the first frame; an mp3 without that header cannot be checked and passes.
    """
    with open(path, "rb") as handle:
        head = handle.read(10)
        start = 0
        if head[:3] == b"ID3" and len(head) == 10:  # skip an ID3v2 tag (its size is 4 x 7-bit "syncsafe" bytes)
            start = 10 + ((head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F))
        handle.seek(start)
        frame = handle.read(64)
        size = os.fstat(handle.fileno()).st_size
    tag = max(frame.find(b"Xing"), frame.find(b"Info"))
    if tag < 0 or len(frame) < tag + 8:
        return False
    flags = int.from_bytes(frame[tag + 4: tag + 8], "big")
    field = tag + 8 + (4 if flags & 1 else 0)  # the frame count comes first when present
    if not flags & 2 or len(frame) < field + 4:
        return False
    declared = int.from_bytes(frame[field: field + 4], "big")
    return size < declared * MP3_TRUNCATION_TOLERANCE


def _unreadable_reason(path: str) -> str:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing_clip"
    except OSError:
        return "unreadable_clip"
    return "empty_clip" if size == 0 else "unreadable_clip"


def text_skip_reason(words: str, filters: RowFilters, normalizer: Normalizer) -> str | None:
    """Why a normalised transcript is dropped, or None to keep it."""
    if not words:
        return "empty_transcript"
    if normalizer.foreign_letters(words):
        return "wrong_script"
    if not filters.keep_digits and contains_digits(words):
        return "contains_digits"
    n_words = words.count(" ") + 1
    if n_words < filters.min_words:
        return "too_few_words"
    if filters.max_words is not None and n_words > filters.max_words:
        return "too_many_words"
    return None


def duration_skip_reason(duration: float, filters: RowFilters) -> str | None:
    if duration < filters.min_duration:
        return "too_short"
    if filters.max_duration is not None and duration > filters.max_duration:
        return "too_long"
    return None


def process_row(row: RawRow, clips_dir: str, normalizer: Normalizer, filters: RowFilters) -> RowResult:
    """Normalise, read the audio header and filter one row."""
    line_no, client_id, clip, sentence, gender, age, accents = row
    words = normalizer(sentence)
    reason = text_skip_reason(words, filters, normalizer)
    if reason:
        return line_no, clip, reason, None, ""
    path = resolve_clip(clips_dir, clip)
    duration, reason, audio_format = read_duration(path)
    if reason is None:
        reason = duration_skip_reason(duration, filters)
    if reason:
        return line_no, clip, reason, None, ""
    utt = Utterance(
        ID=os.path.splitext(os.path.basename(path))[0],
        duration=duration,
        wav=path,
        spk_id=client_id,
        wrd=words,
        gender=gender,
        age=age,
        accents=accents,
    )
    return line_no, clip, None, utt, audio_format


def process_chunk(chunk: list[RawRow], clips_dir: str, normalizer: Normalizer, filters: RowFilters) -> list[RowResult]:
    return [process_row(row, clips_dir, normalizer, filters) for row in chunk]


# Settings of a pool worker process, set once by its initializer (never used in the parent process).
_worker_settings: dict = {}


def _init_worker(clips_dir: str, normalizer: Normalizer, filters: RowFilters) -> None:
    _worker_settings.update(clips_dir=clips_dir, normalizer=normalizer, filters=filters)


def _process_chunk_in_worker(chunk: list[RawRow]) -> list[RowResult]:
    return process_chunk(chunk, **_worker_settings)


def _chunks(rows: Iterable[RawRow], size: int) -> Iterator[list[RawRow]]:
    iterator = iter(rows)
    while chunk := list(islice(iterator, size)):
        yield chunk


# ---------------------------------------------------------------- one split


@dataclass
class SplitStats:
    rows_read: int = 0
    kept: int = 0
    seconds_kept: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    speakers: set[str] = field(default_factory=set)
    audio_formats: Counter = field(default_factory=Counter)  # of the kept clips

    def as_report(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "kept": self.kept,
            "hours_kept": round(self.seconds_kept / 3600, 4),
            "speakers_kept": len(self.speakers),
            "skipped": {reason: self.skipped[reason] for reason in SKIP_REASONS if self.skipped[reason]},
            "skipped_total": sum(self.skipped.values()),
            "audio_formats": dict(self.audio_formats.most_common()),
        }


def prepare_split(split: str, tsv_path: Path, out_dir: Path, results_of, skipped_log) -> SplitStats:
    """Stream one TSV through ``results_of`` (row chunks -> result chunks) into ``out_dir/<split>.csv``."""
    stats = SplitStats()
    # Filled by the TSV reader, which may run in the pool's feeder thread: a deque is thread-safe.
    parse_skips: deque = deque()
    seen_ids: set[str] = set()

    def log_skip(line_no: int, clip: str, reason: str) -> None:
        stats.skipped[reason] += 1
        skipped_log.write(f"{split}\t{line_no}\t{clip}\t{reason}\n")

    def flush_parse_skips() -> None:
        while parse_skips:
            line_no, clip, reason = parse_skips.popleft()
            stats.rows_read += 1
            log_skip(line_no, clip, reason)

    def kept_utterances() -> Iterator[Utterance]:
        for chunk in results_of(_chunks(iter_tsv_rows(tsv_path, parse_skips), CHUNK_ROWS)):
            flush_parse_skips()
            for line_no, clip, reason, utt, audio_format in chunk:
                stats.rows_read += 1
                if reason is None and utt.ID in seen_ids:
                    reason = "duplicate_clip"
                if reason:
                    log_skip(line_no, clip, reason)
                    continue
                seen_ids.add(utt.ID)
                stats.kept += 1
                stats.seconds_kept += utt.duration
                stats.speakers.add(utt.spk_id)
                stats.audio_formats[audio_format] += 1
                yield utt
        flush_parse_skips()

    write_manifest(manifest_path(out_dir, split), kept_utterances())
    return stats


# ---------------------------------------------------------------- the whole release


def _default_workers(tsvs: dict[str, Path]) -> int:
    """All cores, but no more processes than chunks of rows: a small corpus does not pay the pool start-up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    estimated_rows = sum(p.stat().st_size for p in tsvs.values()) // TSV_BYTES_PER_ROW
    return max(1, min(cores, estimated_rows // CHUNK_ROWS))


def _check_inputs(cv_dir: Path, splits: tuple[str, ...]) -> dict[str, Path]:
    if not cv_dir.is_dir():
        raise CommonVoiceNotFoundError(
            f"{cv_dir}: Common Voice folder not found. Pass the folder of one locale of a release "
            "(the one holding clips/, train.tsv, dev.tsv and test.tsv), e.g. cv-corpus-X/fr."
        )
    if not (cv_dir / "clips").is_dir():
        raise CommonVoiceNotFoundError(
            f"{cv_dir / 'clips'}: clips folder not found. Pass the folder of one locale that holds clips/ "
            "and the TSVs (extract the release archive completely)."
        )
    if not splits:
        raise ValueError("no splits asked for: pass at least one of train, dev, test")
    tsvs = {split: cv_dir / f"{split}.tsv" for split in splits}
    missing = [str(p) for p in tsvs.values() if not p.is_file()]
    if missing:
        found = sorted(p.name for p in cv_dir.glob("*.tsv"))
        raise CommonVoiceNotFoundError(
            f"split TSV(s) not found: {missing}; TSVs in {cv_dir}: {found}. Choose splits that exist "
            "(--splits) or extract the release completely."
        )
    for tsv in tsvs.values():
        read_layout(tsv)  # a bad header is an error before any work starts
    return tsvs


def input_fingerprint(cv_dir: Path, tsvs: dict[str, Path], settings: dict) -> dict:
    """What decides the output: the options, the TSVs' sizes and mtimes, the clips folder's mtime."""
    files = {}
    for split, path in tsvs.items():
        stat = path.stat()
        files[split] = {"tsv": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "cv_dir": str(cv_dir),
        "clips_mtime_ns": (cv_dir / "clips").stat().st_mtime_ns,
        "tsvs": files,
        "settings": settings,
    }
    digest = hashlib.sha256(repr(sorted(fingerprint.items())).encode()).hexdigest()[:16]
    return {**fingerprint, "digest": digest}


def _outputs_exist(out_dir: Path, splits: Iterable[str]) -> bool:
    names = [manifest_path(out_dir, s) for s in splits] + [out_dir / REPORT_NAME, out_dir / SKIPPED_LOG_NAME]
    return all(p.exists() for p in names)


def _speakers_in_several_splits(stats: dict[str, SplitStats]) -> int:
    counts: Counter = Counter()
    for split_stats in stats.values():
        counts.update(split_stats.speakers)
    return sum(1 for n in counts.values() if n > 1)


def prepare_common_voice(
    cv_dir,
    out_dir,
    *,
    lang: str,
    workers: int | None = None,
    min_duration: float = 0.0,
    max_duration: float | None = None,
    min_words: int = 1,
    max_words: int | None = None,
    keep_digits: bool = False,
    strip_accents: bool = False,
    generic_normalizer: bool = False,
    splits: tuple[str, ...] = ("train", "dev", "test"),
    force: bool = False,
) -> dict:
    """Prepare the manifests of one Common Voice locale; returns the report (also in out_dir/prepare_report.json).

    A second call with the same inputs and options does no work and returns the stored report with
    ``"status": "up_to_date"``; ``force=True`` redoes it.
    """
    started = time.perf_counter()
    cv_dir, out_dir = Path(cv_dir).resolve(), Path(out_dir).resolve()
    splits = tuple(splits)
    normalizer = get_normalizer(lang, strip_accents=strip_accents, generic=generic_normalizer)
    filters = RowFilters(min_duration, max_duration, min_words, max_words, keep_digits)
    tsvs = _check_inputs(cv_dir, splits)
    settings = {"normalizer": normalizer.settings(), "filters": asdict(filters), "splits": list(splits)}
    fingerprint = input_fingerprint(cv_dir, tsvs, settings)

    if not force and is_done(out_dir, STAGE, fingerprint) and _outputs_exist(out_dir, splits):
        logger.info("%s: manifests up to date (same inputs and options); nothing to do", out_dir)
        return {**read_json(out_dir / REPORT_NAME), "status": "up_to_date"}

    check_writable(out_dir, 4 * sum(p.stat().st_size for p in tsvs.values()), what="manifest folder")  # before any work
    done_marker(out_dir, STAGE).unlink(missing_ok=True)  # outputs are about to change
    n_workers = workers if workers is not None else _default_workers(tsvs)
    if n_workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    stats = _run_splits(tsvs, out_dir, str(cv_dir / "clips"), normalizer, filters, n_workers)

    seconds = time.perf_counter() - started
    rows_read = sum(s.rows_read for s in stats.values())
    report = {
        "status": "prepared",
        "cv_dir": str(cv_dir),
        "out_dir": str(out_dir),
        "lang": normalizer.lang,
        "normalizer": normalizer.settings(),
        "filters": settings["filters"],
        "splits": {split: s.as_report() for split, s in stats.items()},
        "speakers_in_several_splits": _speakers_in_several_splits(stats),
        "skipped_total": sum(sum(s.skipped.values()) for s in stats.values()),
        "skipped_log": str(out_dir / SKIPPED_LOG_NAME),
        "input_fingerprint": fingerprint,
        "workers": n_workers,
        "seconds": round(seconds, 3),
        "clips_per_second": round(rows_read / seconds, 1) if seconds > 0 else None,
    }
    if report["speakers_in_several_splits"]:
        logger.warning(
            "%d speaker(s) appear in more than one split (kept; Common Voice splits should be speaker-disjoint)",
            report["speakers_in_several_splits"],
        )
    other_formats = {split: {f: n for f, n in s.audio_formats.items() if f != COMMON_VOICE_FORMAT}
                     for split, s in stats.items()}
    if any(other_formats.values()):
        logger.warning(
            "clips that are not %s (kept; training down-mixes and resamples them): %s",
            COMMON_VOICE_FORMAT, {split: f for split, f in other_formats.items() if f},
        )
    if report["skipped_total"]:
        logger.info("%d row(s) skipped; see %s", report["skipped_total"], report["skipped_log"])
    atomic_write_json(out_dir / REPORT_NAME, report)
    mark_done(out_dir, STAGE, fingerprint)
    return report


def _run_splits(
    tsvs: dict[str, Path], out_dir: Path, clips_dir: str, normalizer: Normalizer, filters: RowFilters, workers: int
) -> dict[str, SplitStats]:
    """Prepare every split, in one process (workers=1) or with a pool of ``workers`` processes."""
    stats: dict[str, SplitStats] = {}
    with atomic_open(out_dir / SKIPPED_LOG_NAME, "w", encoding="utf-8") as skipped_log:
        skipped_log.write("split\tline\tclip\treason\n")
        if workers == 1:

            def results_of(chunks):
                return (process_chunk(chunk, clips_dir, normalizer, filters) for chunk in chunks)

            for split, tsv in tsvs.items():
                stats[split] = prepare_split(split, tsv, out_dir, results_of, skipped_log)
        else:
            context = multiprocessing.get_context("spawn")  # no fork of a possibly threaded parent (torch)
            with context.Pool(workers, initializer=_init_worker, initargs=(clips_dir, normalizer, filters)) as pool:

                def results_of(chunks):
                    return pool.imap(_process_chunk_in_worker, chunks)

                for split, tsv in tsvs.items():
                    stats[split] = prepare_split(split, tsv, out_dir, results_of, skipped_log)
    return stats


def report_table(report: dict) -> str:
    """A short text summary of a preparation report (the full report is prepare_report.json)."""
    lines = [
        f"prepare: {report['cv_dir']} -> {report['out_dir']} ({report['status']}, lang {report['lang']}, "
        f"{report['seconds']:.1f} s, {report['clips_per_second']:.0f} clips/s)",
        f"{'split':<6} {'rows':>8} {'kept':>8} {'hours':>8} {'speakers':>9}  skipped",
    ]
    for split, stats in report["splits"].items():
        skipped = ", ".join(f"{reason} {n}" for reason, n in stats["skipped"].items()) or "none"
        lines.append(
            f"{split:<6} {stats['rows_read']:>8} {stats['kept']:>8} {stats['hours_kept']:>8.3f} "
            f"{stats['speakers_kept']:>9}  {skipped}"
        )
    if report.get("speakers_in_several_splits"):
        lines.append(f"warning: {report['speakers_in_several_splits']} speaker(s) appear in more than one split")
    if report.get("skipped_total"):
        lines.append(f"skipped rows are listed in {report['skipped_log']}")
    return "\n".join(lines)
