"""Federated overhead: per-round time split into client compute and everything else (Flower + fedasr).

Runs the real `fedasr federate` simulation with the tiny model twice:
  cross-silo   : 10 silos, all train every round;
  cross-device : 1,000+ speaker-clients (pseudo-speakers: 2 real clips each), 20 sampled per round.
Per round it reads metrics.jsonl: the wall time of send+receive+aggregate, the summed and longest client fit
time, and the server's dev evaluation (reported apart: it is a chosen cost, not overhead).

  client compute  = sum of fit-seconds / clients training at once (Ray workers = cores / client_num_cpus)
  overhead        = send_receive + aggregate - client compute          (scheduling, (de)serialising, queues)

Targets: overhead < 10 % of client compute (cross-silo); < 100 ms per sampled client (cross-device).

    .venv/bin/python bench/fl_overhead.py --corpus DIR --seed-checkpoint DIR --work-dir DIR [--rounds 3]

DIR of --corpus: a prepared manifest folder (train.csv, dev.csv); --seed-checkpoint: a warm-up export.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pseudo_speaker_manifest(source_dir: Path, out_dir: Path, speakers: int, per_speaker: int = 2) -> Path:
    """train.csv with ``speakers`` pseudo-speakers of ``per_speaker`` real clips each (clips reused), + dev.csv."""
    from fedasr.data.manifest import manifest_path, read_manifest, write_manifest

    clips = read_manifest(manifest_path(source_dir, "train"))
    rows = []
    for index in range(speakers * per_speaker):
        clip = clips[index % len(clips)]
        rows.append(replace(clip, ID=f"{clip.ID}-p{index}", spk_id=f"pseudo{index // per_speaker:05d}"))
    write_manifest(manifest_path(out_dir, "train"), rows)
    write_manifest(manifest_path(out_dir, "dev"), read_manifest(manifest_path(source_dir, "dev"))[:8])
    return out_dir


def run_federate(partition: Path, seed: Path, out: Path, hparams: str, sets: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "fedasr.cli", "federate", str(REPO / hparams), "--partition", str(partition),
               "--seed-checkpoint", str(seed), "--output-dir", str(out)]
    for item in sets:
        command += ["--set", item]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    from fedasr.fl.metrics_log import METRICS_FILE, read_metrics_rows

    return read_metrics_rows(out / METRICS_FILE)[1:]


def split_round(row: dict, workers: int) -> dict:
    compute = row["train_fit_seconds_sum"] / min(workers, row["sampled"])
    federated = row["seconds"]["send_receive"] + row["seconds"]["aggregate"]
    return {"clients": row["sampled"], "client_compute_s": compute, "overhead_s": federated - compute,
            "round_s": row["seconds"]["round"], "server_eval_s": row["seconds"]["evaluate"]}


def report(name: str, rows: list[dict], workers: int) -> dict:
    parts = [split_round(r, workers) for r in rows[1:] or rows]  # round 1 includes worker start-up: shown apart
    first = split_round(rows[0], workers)
    med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    med["overhead_share"] = med["overhead_s"] / med["client_compute_s"]
    med["overhead_per_client_ms"] = 1000 * med["overhead_s"] / med["clients"]
    med["first_round_overhead_s"] = first["overhead_s"]
    print(f"{name}: " + json.dumps({k: round(v, 3) for k, v in med.items()}))
    return med


def fl_bench_parser(doc: str, *, rounds: int) -> argparse.ArgumentParser:
    """The arguments every federated bench takes: the corpus, the seed checkpoint, a work folder, rounds."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="prepared manifest folder (train.csv, dev.csv)")
    parser.add_argument("--seed-checkpoint", required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--rounds", type=int, default=rounds)
    return parser


def main() -> None:
    parser = fl_bench_parser(__doc__, rounds=3)
    parser.add_argument("--device-clients", type=int, default=1000)
    parser.add_argument("--skip", choices=["silo", "device"], default=None)
    args = parser.parse_args()

    from fedasr.data.partition import partition_manifest

    work = Path(args.work_dir)
    workers = os.cpu_count() or 1
    common = [f"rounds={args.rounds}", "local_epochs=1", "evaluation.dev_max_utterances=8", "annealing.enabled=false",
              "strategy={name: fedavg}", "batch_size=4"]
    results = {"cpu_count": workers}
    manifests = pseudo_speaker_manifest(Path(args.corpus), work / "manifests", args.device_clients + 20)
    if args.skip != "silo":
        silo = work / "silo"
        partition_manifest(manifests, silo, mode="cross-silo", clients=10, warmup_speakers=20, seed=0)
        rows = run_federate(silo, Path(args.seed_checkpoint), work / "silo_run", "hparams/fl/cross_silo.yaml", common)
        results["cross_silo"] = report("cross-silo (10 clients)", rows, workers)
    if args.skip != "device":
        device = work / "device"
        partition_manifest(manifests, device, mode="cross-device", warmup_speakers=20, min_utterances=2, seed=0)
        rows = run_federate(device, Path(args.seed_checkpoint), work / "device_run", "hparams/fl/cross_device.yaml",
                            common + ["clients_per_round=20", "mode=cross-device"])
        results["cross_device"] = report(f"cross-device ({args.device_clients} clients, 20 per round)", rows, workers)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
