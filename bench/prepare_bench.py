"""Benchmark of `prepare_common_voice` end to end on a Common-Voice-shaped folder of N TSV rows.

The clips are hard links to a few real mp3 files (speech from espeak-ng when installed, else a tone), so the
folder costs no disk space while every row still goes through the real path: TSV parsing, normalisation,
``soundfile.info`` on an mp3 header, filtering, manifest writing.

    .venv/bin/python bench/prepare_bench.py [--rows 100000] [--workers N] [--work-dir DIR]

Prints rows (clips) per second end to end (wall clock: depends on what else runs), the CPU time per row
(does not), and the peak resident memory of this process and of its largest
child process (ru_maxrss).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from fedasr.data.commonvoice import prepare_common_voice

HEADER = (
    "client_id",
    "path",
    "sentence_id",
    "sentence",
    "sentence_domain",
    "up_votes",
    "down_votes",
    "age",
    "gender",
    "accents",
    "variant",
    "locale",
    "segment",
)
SENTENCES = (
    "Le chat dort sur le canapé.",
    "« Peut-être » demain, dit-il.",
    "L’homme est arrivé aujourd’hui.",
    "Qu'il vienne jusqu'à nous !",
    "Nous partirons à la montagne cet été.",
    "Il a 3 enfants.",  # dropped: contains digits
)
SPLIT_SHARES = (("train", 0.8), ("dev", 0.1), ("test", 0.1))
ROWS_PER_SPEAKER = 20


def make_source_clips(folder: Path, count: int) -> list[Path]:
    """A few real mp3 files, 48 kHz mono, 3-5 s."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(count):
        path = folder / f"source_{i}.mp3"
        samples, rate = _speech_or_tone(SENTENCES[i % len(SENTENCES)], seconds=3.0 + i % 3)
        sf.write(path, samples, rate, format="MP3")
        clips.append(path)
    return clips


def _speech_or_tone(text: str, seconds: float) -> tuple[np.ndarray, int]:
    if shutil.which("espeak-ng"):
        wav = subprocess.run(["espeak-ng", "-v", "fr", "--stdout", text], capture_output=True, check=True).stdout
        path = Path(tempfile.mkstemp(suffix=".wav")[1])
        try:
            path.write_bytes(wav)
            samples, rate = sf.read(path, dtype="float32")
        finally:
            path.unlink()
        return samples, rate
    rate = 48000
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32"), rate


def build_release(root: Path, rows: int, source_clips: list[Path]) -> None:
    """clips/ of hard links + train/dev/test.tsv (new header layout) with ``rows`` rows in all."""
    clips = root / "clips"
    clips.mkdir(parents=True)
    row = 0
    for split, share in SPLIT_SHARES:
        n = round(rows * share) if split != "test" else rows - row
        with open(root / f"{split}.tsv", "w", encoding="utf-8") as tsv:
            tsv.write("\t".join(HEADER) + "\n")
            for _ in range(n):
                name = f"common_voice_fr_{row:08d}.mp3"
                os.link(source_clips[row % len(source_clips)], clips / name)
                speaker = f"{split}_{row // ROWS_PER_SPEAKER:06x}"
                sentence = SENTENCES[row % len(SENTENCES)]
                fields = (speaker, name, str(row), sentence, "", "2", "0", "thirties", "", "", "", "fr", "")
                tsv.write("\t".join(fields) + "\n")
                row += 1


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children (the pool's workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def peak_memory_mb() -> tuple[float, float]:
    """(this process, largest waited-for child) peak resident memory in MB (ru_maxrss is in kB on Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="TSV rows in all splits (default 100000)")
    parser.add_argument("--workers", type=int, default=None, help="header-reading processes (default: all cores)")
    parser.add_argument("--source-clips", type=int, default=None,
                        help="distinct real mp3 files behind the links (default: 6, more past 300,000 rows: a file "
                             "takes at most 65,000 hard links on ext4)")
    parser.add_argument("--work-dir", default=None, help="folder to build in (default: a temporary folder, removed)")
    args = parser.parse_args(argv)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="prepare_bench_"))
    try:
        if (work / "cv").exists():
            raise SystemExit(f"{work / 'cv'} exists: pass an empty --work-dir")
        started = time.perf_counter()
        sources = make_source_clips(work / "sources", args.source_clips or max(6, -(-args.rows // 50_000)))
        build_release(work / "cv", args.rows, sources)
        build_seconds = time.perf_counter() - started

        load_before = f"{os.getloadavg()[0]:.2f}"
        cpu_before = cpu_seconds()
        started = time.perf_counter()
        report = prepare_common_voice(work / "cv", work / "out", lang="fr", workers=args.workers, force=True)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds() - cpu_before
        own_mb, child_mb = peak_memory_mb()
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    kept = sum(s["kept"] for s in report["splits"].values())
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"built {args.rows} rows ({len(sources)} source clips, hard links) in {build_seconds:.1f} s")
    print(f"prepare_common_voice: {args.rows} rows in {seconds:.2f} s = {args.rows / seconds:,.0f} clips/s "
          f"end to end ({report['workers']} workers); kept {kept}, skipped {report['skipped_total']}")
    cores = len(os.sched_getaffinity(0))
    print(f"CPU time (user+sys, main + workers): {cpu:.1f} s = {cpu / args.rows * 1e6:.0f} us per row; "
          f"on {cores} otherwise idle cores that is at most {args.rows / cpu * cores:,.0f} clips/s")
    print(f"peak memory (ru_maxrss): main process {own_mb:.0f} MB, largest child process {child_mb:.0f} MB; "
          f"upper bound main + {report['workers']} x largest child = {own_mb + child_mb * report['workers']:.0f} MB")
    print(f"load average before/after: {load_before} / {os.getloadavg()[0]:.2f} (the machine is shared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
