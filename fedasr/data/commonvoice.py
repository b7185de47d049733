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
``unreadable_clip`` (not decodable audio), ``truncated_clip`` (an mp3 cut short: a partial download, seen either
in its Xing/Info header's byte count or in a last frame that runs past the end of the file; its duration would be
wrong and its audio would miss the end of the sentence), ``implausible_speech_rate`` (more transcript characters per
second of audio than anyone speaks: a clip cut at a frame boundary, or a transcript that belongs to a longer clip),
``too_short``, ``too_long``, and last ``duplicate_clip`` (a row that passed everything but whose clip is already
in this split's manifest). Every skipped row is named in ``out_dir/skipped.tsv`` (split, line, clip, reason) and
counted in the report. Kept clips longer than ``warn_longer_than`` seconds (default 10 s, SpeechBrain's Common
Voice recipes' ``avoid_if_longer_than``) are counted per split (``long_clips``) and warned about.

The "up to date" check fingerprints the options, the TSVs, and the size and mtime of every clip the TSVs name, so
a clip replaced or emptied in place is seen. The output folder may not be the Common Voice folder or lie inside
it, and it may not hold manifests of another Common Voice folder that this run would leave in place (a
``--splits`` run beside another corpus' dev.csv/test.csv): both are refused before anything is written.

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
from fedasr.utils.device import usable_cores
from fedasr.utils.io import atomic_open, atomic_write_json, done_marker, is_done, mark_done, read_json
from fedasr.utils.preflight import check_writable

logger = logging.getLogger(__name__)

STAGE = "prepare_commonvoice"
FORMAT_VERSION = 3  # bump when the output of the same inputs and options changes
REPORT_NAME = "prepare_report.json"
SKIPPED_LOG_NAME = "skipped.tsv"
REQUIRED_COLUMNS = ("client_id", "path", "sentence")
ACCENT_COLUMNS = ("accents", "accent")  # new releases, old releases
CHUNK_ROWS = 1000  # rows sent to a worker at a time
TSV_BYTES_PER_ROW = 150  # a rough size of a Common Voice TSV row, to estimate a corpus' size
MAX_LOGGED_MALFORMED = 20  # per TSV; all of them are in skipped.tsv anyway
COMMON_VOICE_FORMAT = "48000 Hz, 1 ch"
MP3_TRUNCATION_TOLERANCE = 0.99  # a complete mp3 is at least as long as its Xing/Info header's byte count
MP3_TAIL_BYTES = 3072  # read from the end of an mp3 to check its last frames (2 frames of the largest size: 2 x 1441)
# Characters of the normalised transcript (spaces not counted) per second of audio above which a row is dropped as
# ``implausible_speech_rate``. Read speech runs at about 10-15 (fast speakers about 20; a clip's silences lower it);
# 5 synthetic corpora (espeak-ng, 125-185 words/min, fr and en, "hard" preset up to 1.15x faster) reach 20.7 at most
# (bench/RESULTS.md). A clip cut to 30 % of its bytes has about 3.3x its rate (11 -> 37), so 30 catches it and
# leaves room for real fast speakers. Logographic scripts (fewer characters per second) are never caught: the
# bound is then a no-op, not a false drop.
DEFAULT_MAX_CHARS_PER_SECOND = 30.0
DEFAULT_WARN_LONGER_THAN = 10.0  # seconds: SpeechBrain's CommonVoice recipes drop longer clips (avoid_if_longer_than)

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
    "implausible_speech_rate",
    "too_short",
    "too_long",
    "duplicate_clip",
)


class CommonVoiceFormatError(ValueError):
    """A Common Voice TSV that cannot be read; the message names the file, what is wrong and the fix."""


class CommonVoiceNotFoundError(FileNotFoundError):
    """The Common Voice folder, its clips/ folder or a split's TSV is missing."""


class PrepareOutputError(ValueError):
    """The output folder cannot take these manifests (inside the release, or holding another corpus' manifests)."""


@dataclass(frozen=True)
class RowFilters:
    """Options deciding which rows are kept (they travel to the worker processes)."""

    min_duration: float = 0.0
    max_duration: float | None = None
    min_words: int = 1
    max_words: int | None = None
    keep_digits: bool = False
    max_chars_per_second: float | None = DEFAULT_MAX_CHARS_PER_SECOND


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
# A worker's answer: (line number, clip name, skip reason or None, Utterance or None, audio format or "",
# (size, mtime_ns) of the clip file, (-1, -1) when it is missing).
RowResult = tuple[int, str, "str | None", "Utterance | None", str, tuple[int, int]]


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
    """True when the mp3 file was cut short (a partial download). Two checks, reading ~3 KB, no decoding:

    - the stream size in a Xing/Info header (written by LAME, ffmpeg...) is larger than the file;
    - the chain of MPEG frame headers in the file's last bytes runs past its end: the last frame is incomplete.
      This is what catches Common Voice clips, which are constant-bitrate mp3 without a Xing/Info header: for them
      libsndfile estimates the duration from the file size, so a partial file otherwise looks whole and short.

    A file cut exactly at a frame boundary passes both (the speaking-rate bound of :func:`process_row` is the
    safety net); a file whose frames cannot be followed (free-format bitrate, unknown trailer) passes.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(10)
        start = 0
        if head[:3] == b"ID3" and len(head) == 10:  # skip an ID3v2 tag (its size is 4 x 7-bit "syncsafe" bytes)
            start = 10 + ((head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F))
        handle.seek(start)
        frame = handle.read(64)
        tail_start = max(start, size - MP3_TAIL_BYTES)
        handle.seek(tail_start)
        tail = handle.read(size - tail_start)
    return _xing_says_truncated(frame, size) or _last_frame_is_cut(tail)


def _xing_says_truncated(frame: bytes, size: int) -> bool:
    tag = max(frame.find(b"Xing"), frame.find(b"Info"))
    if tag < 0 or len(frame) < tag + 8:
        return False
    flags = int.from_bytes(frame[tag + 4: tag + 8], "big")
    field = tag + 8 + (4 if flags & 1 else 0)  # the frame count comes first when present
    if not flags & 2 or len(frame) < field + 4:
        return False
    declared = int.from_bytes(frame[field: field + 4], "big")
    return size < declared * MP3_TRUNCATION_TOLERANCE


# MPEG audio frame headers (ISO 11172-3 / 13818-3): bit rates in kbit/s by (MPEG-1?, layer), index 1..14.
_BITRATES = {
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version bits


def _frame_at(data: bytes, pos: int) -> tuple[int, int] | None:
    """(frame length in bytes, stream key) of a valid MPEG audio frame header at ``pos``, else None."""
    b1, b2 = data[pos + 1], data[pos + 2]
    if data[pos] != 0xFF or b1 & 0xE0 != 0xE0:
        return None
    version, layer_bits = (b1 >> 3) & 3, (b1 >> 1) & 3
    bitrate_index, rate_index, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return None  # reserved values, or a free-format bit rate (length unknown)
    layer = 4 - layer_bits
    bitrate = _BITRATES[(version == 3, layer)][bitrate_index - 1] * 1000
    rate = _SAMPLE_RATES[version][rate_index]
    if layer == 1:
        length = (12 * bitrate // rate + padding) * 4
    elif layer == 3 and version != 3:  # MPEG-2 / 2.5 layer III: 576 samples per frame
        length = 72 * bitrate // rate + padding
    else:
        length = 144 * bitrate // rate + padding
    return length, b1 << 8 | (b2 & 0x0C)  # key: version, layer, protection, sample rate (constant in a stream)


def _last_frame_is_cut(tail: bytes) -> bool:
    """True when a chain of at least 2 MPEG frames in ``tail`` (the file's last bytes) runs past the end."""
    end = len(tail)
    if end >= 128 and tail[end - 128: end - 125] == b"TAG":  # ID3v1 tag
        end -= 128
    if end >= 32 and tail[end - 32: end - 24] == b"APETAGEX":  # APEv2 footer: tag size + optional header
        flags = int.from_bytes(tail[end - 12: end - 8], "little")
        end -= int.from_bytes(tail[end - 20: end - 16], "little") + (32 if flags & 0x80000000 else 0)
    pos = tail.find(b"\xff", 0, max(end - 3, 0))
    while pos >= 0:
        first = _frame_at(tail, pos)
        if first is not None:
            length, key = first
            frames, nxt = 1, pos + length
            while nxt < end - 3:  # a whole header fits before the end: follow the chain
                frame = _frame_at(tail, nxt)
                if frame is None or frame[1] != key:
                    break
                frames, nxt = frames + 1, nxt + frame[0]
            else:
                if frames >= 2:  # a real chain (a stray 0xFF in the audio data rarely starts two)
                    if nxt == end:
                        return False
                    return nxt > end or tail[nxt] == 0xFF  # past the end, or a header cut after 1-3 bytes
            if frames >= 2:  # the chain stopped before the end (an unknown trailer): look past it, not inside it
                pos = nxt - 1
        pos = tail.find(b"\xff", pos + 1, max(end - 3, 0))
    return False


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


def speech_rate_skip_reason(words: str, duration: float, filters: RowFilters) -> str | None:
    """``implausible_speech_rate`` when the transcript has more characters (spaces not counted) per second of audio
    than ``filters.max_chars_per_second``: the audio is too short for its sentence."""
    limit = filters.max_chars_per_second
    if limit is not None and len(words) - words.count(" ") > limit * duration:
        return "implausible_speech_rate"
    return None


def clip_stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a clip file, (-1, -1) when it cannot be found: what the "up to date" check compares."""
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def process_row(row: RawRow, clips_dir: str, normalizer: Normalizer, filters: RowFilters) -> RowResult:
    """Normalise, read the audio header and filter one row."""
    line_no, client_id, clip, sentence, gender, age, accents = row
    path = resolve_clip(clips_dir, clip)
    stat = clip_stat(path)  # every row's clip, kept or not, is part of the inputs' fingerprint
    words = normalizer(sentence)
    reason = text_skip_reason(words, filters, normalizer)
    if reason:
        return line_no, clip, reason, None, "", stat
    duration, reason, audio_format = read_duration(path)
    if reason is None:
        reason = speech_rate_skip_reason(words, duration, filters) or duration_skip_reason(duration, filters)
    if reason:
        return line_no, clip, reason, None, "", stat
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
    return line_no, clip, None, utt, audio_format, stat


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
    long_clips: int = 0  # kept clips longer than warn_longer_than
    clips: "ClipDigest" = field(default_factory=lambda: ClipDigest())

    def as_report(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "kept": self.kept,
            "hours_kept": round(self.seconds_kept / 3600, 4),
            "speakers_kept": len(self.speakers),
            "skipped": {reason: self.skipped[reason] for reason in SKIP_REASONS if self.skipped[reason]},
            "skipped_total": sum(self.skipped.values()),
            "long_clips": self.long_clips,
            "audio_formats": dict(self.audio_formats.most_common()),
        }


class ClipDigest:
    """A digest of (clip, size, mtime) over the well-formed rows of one TSV, in order."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0

    def add(self, clip: str, stat: tuple[int, int]) -> None:
        self._hash.update(f"{clip}\t{stat[0]}\t{stat[1]}\n".encode("utf-8", "surrogateescape"))
        self.count += 1

    def result(self) -> dict:
        return {"clips": self.count, "sha256": self._hash.hexdigest()[:32]}


def prepare_split(split: str, tsv_path: Path, out_dir: Path, results_of, skipped_log,
                  warn_longer_than: float | None = None) -> SplitStats:
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
            for line_no, clip, reason, utt, audio_format, clip_file in chunk:
                stats.rows_read += 1
                stats.clips.add(clip, clip_file)
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
                if warn_longer_than is not None and utt.duration > warn_longer_than:
                    stats.long_clips += 1
                yield utt
        flush_parse_skips()

    write_manifest(manifest_path(out_dir, split), kept_utterances())
    return stats


# ---------------------------------------------------------------- the whole release


def _default_workers(tsvs: dict[str, Path]) -> int:
    """All cores, but no more processes than chunks of rows: a small corpus does not pay the pool start-up."""
    cores = usable_cores()
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


def input_fingerprint(cv_dir: Path, tsvs: dict[str, Path], settings: dict, clips: dict | None = None) -> dict:
    """What decides the output: the options, the TSVs' sizes and mtimes, the clips folder's mtime, and ``clips``:
    per split, a digest of the size and mtime of every clip its TSV names (:func:`clips_fingerprint`)."""
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
        "clips": clips,
    }
    digest = hashlib.sha256(repr(sorted(fingerprint.items())).encode()).hexdigest()[:16]
    return {**fingerprint, "digest": digest}


def clips_fingerprint(tsvs: dict[str, Path], clips_dir: str) -> dict:
    """Per split, the digest of (clip, size, mtime) over the TSV's well-formed rows: the same digest preparation
    computes from the workers' answers (a stat per clip, no audio read)."""
    result = {}
    for split, tsv in tsvs.items():
        digest = ClipDigest()
        for row in iter_tsv_rows(tsv, deque()):
            digest.add(row[2], clip_stat(resolve_clip(clips_dir, row[2])))
        result[split] = digest.result()
    return result


def _up_to_date(out_dir: Path, fingerprint: dict, tsvs: dict[str, Path], clips_dir: str, splits) -> bool:
    """The outputs exist and were made from these inputs and options, the clips' sizes and mtimes included."""
    marker = done_marker(out_dir, STAGE)
    if not marker.exists() or not _outputs_exist(out_dir, splits):
        return False
    try:
        done = read_json(marker)
    except (OSError, ValueError):
        return False
    same_except_clips = all(done.get(k) == v for k, v in fingerprint.items() if k not in ("clips", "digest"))
    if not same_except_clips:  # no need to stat every clip
        return False
    return done == input_fingerprint(Path(fingerprint["cv_dir"]), tsvs, fingerprint["settings"],
                                     clips_fingerprint(tsvs, clips_dir))


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
    max_chars_per_second: float | None = DEFAULT_MAX_CHARS_PER_SECOND,
    warn_longer_than: float | None = DEFAULT_WARN_LONGER_THAN,
) -> dict:
    """Prepare the manifests of one Common Voice locale; returns the report (also in out_dir/prepare_report.json).

    A second call with the same inputs and options (the clips' sizes and mtimes included) does no work and returns
    the stored report with ``"status": "up_to_date"``; ``force=True`` redoes it. ``max_chars_per_second``: rows
    whose transcript is too long for their audio are skipped (``implausible_speech_rate``; None: no bound).
    ``warn_longer_than``: kept clips longer than this many seconds are counted (``long_clips``) and warned about
    (None: no warning; ``max_duration`` drops clips instead).
    """
    started = time.perf_counter()
    cv_dir, out_dir = Path(cv_dir).resolve(), Path(out_dir).resolve()
    splits = tuple(splits)
    _check_output_folder(cv_dir, out_dir)
    normalizer = get_normalizer(lang, strip_accents=strip_accents, generic=generic_normalizer)
    if max_chars_per_second is not None and max_chars_per_second <= 0:
        raise ValueError(f"max_chars_per_second must be > 0 or None (no bound), got {max_chars_per_second}")
    filters = RowFilters(min_duration, max_duration, min_words, max_words, keep_digits, max_chars_per_second)
    tsvs = _check_inputs(cv_dir, splits)
    settings = {"normalizer": normalizer.settings(), "filters": asdict(filters), "splits": list(splits),
                "warn_longer_than": warn_longer_than}
    fingerprint = input_fingerprint(cv_dir, tsvs, settings)
    clips_dir = str(cv_dir / "clips")

    if not force and _up_to_date(out_dir, fingerprint, tsvs, clips_dir, splits):
        logger.info("%s: manifests up to date (same inputs, clips and options); nothing to do", out_dir)
        return {**read_json(out_dir / REPORT_NAME), "status": "up_to_date"}
    _refuse_other_corpus_left_behind(cv_dir, out_dir, splits)

    check_writable(out_dir, 4 * sum(p.stat().st_size for p in tsvs.values()), what="manifest folder")  # before any work
    done_marker(out_dir, STAGE).unlink(missing_ok=True)  # outputs are about to change
    n_workers = workers if workers is not None else _default_workers(tsvs)
    if n_workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    stats = _run_splits(tsvs, out_dir, clips_dir, normalizer, filters, n_workers, warn_longer_than)
    fingerprint = input_fingerprint(cv_dir, tsvs, settings, {split: s.clips.result() for split, s in stats.items()})

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
        "warn_longer_than": warn_longer_than,
        "long_clips": sum(s.long_clips for s in stats.values()),
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
    if report["long_clips"]:
        logger.warning(
            "%d kept clip(s) are longer than %g s (%s): SpeechBrain's Common Voice recipes drop them "
            "(avoid_if_longer_than) and they dominate a batch's memory. Pass --max-duration %g to drop them.",
            report["long_clips"], warn_longer_than,
            ", ".join(f"{split} {s.long_clips}" for split, s in stats.items() if s.long_clips), warn_longer_than,
        )
    if report["skipped_total"]:
        logger.info("%d row(s) skipped; see %s", report["skipped_total"], report["skipped_log"])
    atomic_write_json(out_dir / REPORT_NAME, report)
    mark_done(out_dir, STAGE, fingerprint)
    return report


def _check_output_folder(cv_dir: Path, out_dir: Path) -> None:
    """The manifests may not be written into the Common Voice release itself (both paths resolved)."""
    if out_dir == cv_dir or cv_dir in out_dir.parents:
        where = "is" if out_dir == cv_dir else "lies inside"
        raise PrepareOutputError(
            f"output folder {out_dir} {where} the Common Voice folder {cv_dir}: the manifests, {REPORT_NAME} and "
            f"{SKIPPED_LOG_NAME} would be written into the release. Choose a folder outside it, e.g. "
            f"{cv_dir.parent / (cv_dir.name + '_manifests')}."
        )


def _refuse_other_corpus_left_behind(cv_dir: Path, out_dir: Path, splits: tuple[str, ...]) -> None:
    """Refuse a run that would leave manifests of another Common Voice folder beside its own (e.g. ``--splits
    train`` into a folder holding another corpus' dev.csv and test.csv, which ``federate`` would then read)."""
    report_path = out_dir / REPORT_NAME
    if not report_path.exists():
        return
    try:
        earlier = read_json(report_path)
        earlier_cv, earlier_splits = str(Path(earlier["cv_dir"])), list(earlier["splits"])
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: the manifests beside it are of unknown origin
        earlier_cv, earlier_splits = "an unknown Common Voice folder (unreadable report)", ["train", "dev", "test"]
    if earlier_cv == str(cv_dir):
        return
    left = [manifest_path(out_dir, s).name for s in earlier_splits
            if s not in splits and manifest_path(out_dir, s).exists()]
    if left:
        raise PrepareOutputError(
            f"{out_dir} holds {', '.join(left)} prepared from another Common Voice folder, {earlier_cv} (see "
            f"{report_path}); preparing {cv_dir} with splits {list(splits)} there would leave them beside this "
            "corpus' manifests, and `fedasr federate` reads dev.csv next to the partition's source. Choose another "
            f"output folder, prepare all of {left} from {cv_dir} (--splits), or delete {', '.join(left)} first."
        )


def _run_splits(
    tsvs: dict[str, Path], out_dir: Path, clips_dir: str, normalizer: Normalizer, filters: RowFilters, workers: int,
    warn_longer_than: float | None = None,
) -> dict[str, SplitStats]:
    """Prepare every split, in one process (workers=1) or with a pool of ``workers`` processes."""
    stats: dict[str, SplitStats] = {}
    with atomic_open(out_dir / SKIPPED_LOG_NAME, "w", encoding="utf-8") as skipped_log:
        skipped_log.write("split\tline\tclip\treason\n")
        if workers == 1:

            def results_of(chunks):
                return (process_chunk(chunk, clips_dir, normalizer, filters) for chunk in chunks)

            for split, tsv in tsvs.items():
                stats[split] = prepare_split(split, tsv, out_dir, results_of, skipped_log, warn_longer_than)
        else:
            context = multiprocessing.get_context("spawn")  # no fork of a possibly threaded parent (torch)
            with context.Pool(workers, initializer=_init_worker, initargs=(clips_dir, normalizer, filters)) as pool:

                def results_of(chunks):
                    return pool.imap(_process_chunk_in_worker, chunks)

                for split, tsv in tsvs.items():
                    stats[split] = prepare_split(split, tsv, out_dir, results_of, skipped_log, warn_longer_than)
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
    if report.get("long_clips"):
        lines.append(f"warning: {report['long_clips']} kept clip(s) longer than {report['warn_longer_than']:g} s "
                     f"(--max-duration {report['warn_longer_than']:g} drops them)")
    if report.get("skipped_total"):
        lines.append(f"skipped rows are listed in {report['skipped_log']}")
    return "\n".join(lines)
