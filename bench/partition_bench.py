"""Benchmark of `partition_manifest` (cross-device: one client per speaker) on a large Common-Voice-shaped manifest.

Builds a train.csv of N rows over S speakers (128-hex client ids, French sentences of 4-14 words, 1-8 s
durations, speakers' utterance counts heavy-tailed like Common Voice: weight of speaker r ~ 1 / (r + 1)^0.9),
then partitions it in a fresh process and reports wall seconds and that process's peak RSS (VmHWM).

    .venv/bin/python bench/partition_bench.py                       # 500,000 rows, 20,000 speakers
    .venv/bin/python bench/partition_bench.py --rows 100000 --speakers 5000 --work-dir /tmp/pb
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORDS = ("le chat la maison un deux trois voiture rouge bleu aujourd'hui l'homme demain soleil pluie ville "
         "rivière montagne enfant école livre table chaise porte fenêtre jardin arbre fleur oiseau mer").split()


def build_manifest(path: Path, rows: int, speakers: int, seed: int = 0) -> None:
    """A train.csv in fedasr's manifest format, written row by row."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, speakers + 1) ** 0.9
    owner = rng.choice(speakers, size=rows, p=weights / weights.sum())
    owner[:speakers] = np.arange(speakers)  # every speaker has at least one row
    ids = [hashlib.sha512(f"speaker{s}".encode()).hexdigest() for s in range(speakers)]
    lengths = rng.integers(4, 15, size=rows)
    durations = rng.uniform(1.0, 8.0, size=rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("ID", "duration", "wav", "spk_id", "wrd", "gender", "age", "accents"))
        for i in range(rows):
            words = " ".join(WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(lengths[i]))
            writer.writerow((f"common_voice_fr_{i:08d}", f"{durations[i]:.3f}", f"/data/cv/fr/clips/common_voice_fr_{i:08d}.mp3",
                             ids[owner[i]], words, ("male", "female", "")[owner[i] % 3], "thirties", ""))


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(manifest_dir: str, out_dir: str, clients: int, warmup: int) -> dict:
    sys.path.insert(0, str(REPO))
    from fedasr.data.partition import partition_manifest

    before = vm_hwm_mb()
    started = time.perf_counter()
    result = partition_manifest(manifest_dir, out_dir, mode="cross-device", clients=clients, warmup_speakers=warmup)
    return {"seconds": round(time.perf_counter() - started, 1), "peak_mb": round(vm_hwm_mb(), 1),
            "after_imports_mb": round(before, 1), "clients": len(result["partition"]["clients"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--speakers", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=20_000, help="cap on cross-device clients (default 20000)")
    parser.add_argument("--warmup-speakers", type=int, default=117)
    parser.add_argument("--work-dir", default=None, help="folder to build in (default: a temporary folder, removed)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))))
        return 0
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="partition_bench_"))
    try:
        started = time.perf_counter()
        build_manifest(work / "manifests" / "train.csv", args.rows, args.speakers)
        built = time.perf_counter() - started
        size_mb = (work / "manifests" / "train.csv").stat().st_size / 2**20
        load = os.getloadavg()[0]
        done = subprocess.run([sys.executable, __file__, "--child", str(work / "manifests"), str(work / "part"),
                               str(args.clients), str(args.warmup_speakers)], capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"partition failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
          f"load average before the partition {load:.1f}")
    print(f"built train.csv: {args.rows:,} rows, {args.speakers:,} speakers, {size_mb:.0f} MB in {built:.1f} s")
    print(f"partition_manifest cross-device: {row['clients']:,} clients in {row['seconds']} s; peak RSS "
          f"{row['peak_mb']:.0f} MB (after imports {row['after_imports_mb']:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
