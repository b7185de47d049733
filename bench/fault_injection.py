"""Fault injection: a cross-device simulation with unreliable clients, to check that nothing is lost.

Runs the real `fedasr federate` (Flower simulation on Ray, the tiny model) on pseudo-speaker clients (2 real clips
each) with faults from the fl hparams' `faults:` section: a dropout probability, a slow tail (a fraction of clients
sleeping past the round deadline) and crashes (probability 1 / clients-per-round: about one per round). Then it
reads what the server logged and checks what a user relies on:

  faults injected   per kind, recomputed from the seeded draws of the sampled clients (fedasr.fl.faults)
  failures logged   per kind, from the reasons in metrics.jsonl `failed` (crash, dropout, missed deadline)
  rounds completed  rounds that aggregated (not `round_skipped`)
  clients dropped   per round: sampled, aggregated, failed by kind
  data lost         "none" when every round has its metrics line, the checkpoint holds the last round, and the
                    best/final models exist and are finite

    .venv/bin/python bench/fault_injection.py --corpus DIR --seed-checkpoint DIR --work-dir DIR \
        [--clients 200 --per-round 10 --rounds 5 --dropout 0.2 --slow 0.1 --round-timeout 60]

Round 1 runs without faults (faults.first_round=2): it also pays Ray's and the models' start-up, which must not be
raced against the round deadline.

DIR of --corpus: a prepared manifest folder (train.csv, dev.csv); --seed-checkpoint: a warm-up export.
"""

from __future__ import annotations

import collections
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fl_overhead import fl_bench_parser, pseudo_speaker_manifest, run_federate  # noqa: E402  (same corpus, runner)

KINDS = {"crash": "crashed in round", "dropout": "dropped out in round", "deadline": "no reply within the round deadline",
         "nan": "NaN or infinity"}


def failure_kind(reason: str) -> str:
    return next((kind for kind, text in KINDS.items() if text in reason), "other")


def data_lost(out: Path, rows: list[dict], rounds: int) -> list[str]:
    """What a user would miss after the run: [] when every round's record, checkpoint and models are there."""
    problems = []
    if [r["round"] for r in rows] != list(range(rounds + 1)):
        problems.append(f"metrics.jsonl rounds are {[r['round'] for r in rows]}")
    from fedasr.fl.checkpoint import load_server_state

    state = load_server_state(out)
    if state is None or state.round != rounds:
        problems.append(f"the checkpoint holds round {state.round if state else None}, not {rounds}")
    for name in ("best_model.pt", "final_model.pt"):
        if not (out / name).exists():
            problems.append(f"{name} missing")
            continue
        model = torch.load(out / name)["state_dict"]
        if not all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point()):
            problems.append(f"{name} is not finite")
    return problems


def main() -> None:
    parser = fl_bench_parser(__doc__, rounds=5)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--slow", type=float, default=0.1, help="fraction of stragglers (they miss the deadline)")
    parser.add_argument("--round-timeout", type=float, default=60.0)
    args = parser.parse_args()

    from fedasr.data.partition import partition_manifest

    work = Path(args.work_dir)
    manifests = pseudo_speaker_manifest(Path(args.corpus), work / "manifests", args.clients + 20)
    partition = work / "device"
    if not (partition / "partition.json").exists():
        partition_manifest(manifests, partition, mode="cross-device", warmup_speakers=20, min_utterances=2, seed=0)
    out = work / "run"
    sets = [f"rounds={args.rounds}", "local_epochs=1", "batch_size=4", "mode=cross-device",
            f"clients_per_round={args.per_round}", "evaluation.dev_max_utterances=8",
            "evaluation.server_wer_utterances=4", "evaluation.test_decoding=greedy", "annealing.enabled=false",
            f"round_timeout={args.round_timeout}", f"faults.dropout={args.dropout}",
            f"faults.crash={1 / args.per_round:.6f}", f"faults.slow={args.slow}",
            f"faults.slow_seconds={args.round_timeout + 15}", "faults.first_round=2"]
    started = time.time()
    run_federate(partition, Path(args.seed_checkpoint), out, "hparams/fl/cross_device.yaml", sets)
    wall = time.time() - started
    from fedasr.fl.metrics_log import METRICS_FILE, read_metrics_rows

    rows = read_metrics_rows(out / METRICS_FILE)

    from fedasr.fl.faults import draw_faults, faults_from_dict

    resolved = json.loads((out / "fl_config.json").read_text())["config"]
    faults, seed = faults_from_dict(resolved["faults"]), int(resolved["seed"])
    injected, observed = collections.Counter(), collections.Counter()
    print("round | sampled | aggregated | injected (recomputed from the seeded draws) | failed (from metrics.jsonl) "
          "| healthy clients past the deadline | skipped | send+receive s")
    for row in rows[1:]:
        sampled = row["clients"] + [client for client, _ in row["failed"]]  # simulation: all are partition ids
        drawn = {pid: draw_faults(faults, seed, row["round"], pid) for pid in sampled}
        kinds = collections.Counter(kind for pid in sampled for kind in drawn[pid])
        failed = collections.Counter(failure_kind(reason) for _, reason in row["failed"])
        queued = sum(1 for pid, reason in row["failed"] if failure_kind(reason) == "deadline" and not drawn[pid])
        injected.update(kinds)
        observed.update(failed)
        print(f"{row['round']} | {row['sampled']} | {len(row['clients'])} | {dict(sorted(kinds.items()))} | "
              f"{dict(sorted(failed.items()))} | {queued} | {row['round_skipped']} | {row['seconds']['send_receive']:.1f}")
    completed = sum(not r["round_skipped"] for r in rows[1:])
    lost = data_lost(out, rows, args.rounds)
    result = {"faults_injected": dict(sorted(injected.items())), "failures_logged": dict(sorted(observed.items())),
              "rounds_completed": f"{completed}/{args.rounds}",
              "dev_wer": [round(r["dev_wer"], 4) for r in rows], "all_dev_wer_finite": all(math.isfinite(r["dev_wer"]) for r in rows),
              "data_lost": "; ".join(lost) or "none", "wall_s": round(wall, 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
