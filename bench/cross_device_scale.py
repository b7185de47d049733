"""Cross-device scale: round time and memory as the number of clients and of clients per round grow.

Each setting is one real `federate` simulation (tiny model, Ray on loopback, FedAvg, 1 local epoch on 2 clips per
pseudo-speaker client) in a child process whose ServerApp is profiled with cProfile. Per setting it reports:
  - the last round's split (as bench/fl_overhead.py): client compute = summed fit seconds / parallel workers,
    overhead = send+receive+aggregate - client compute, and the overhead per sampled client;
  - the peak memory of the whole process tree (driver + Ray's GCS, raylet and workers), sampled every 0.5 s as
    the sum of PSS (shared library pages split between processes, so the sum is not inflated), and its largest
    single process;
  - the server functions with the most cumulative time in the last setting (where the time goes).

    .venv/bin/python bench/cross_device_scale.py --corpus DIR --seed-checkpoint DIR --work-dir DIR
    .venv/bin/python bench/cross_device_scale.py ... --settings 100:20 2000:20 10000:20    # memory vs clients
    .venv/bin/python bench/cross_device_scale.py ... --settings 2000:10 2000:20 2000:50 2000:100  # scaling curve
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fl_overhead import pseudo_speaker_manifest, split_round  # noqa: E402


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreeMemory(threading.Thread):
    """Samples the summed PSS of a process tree until stopped; keeps the peaks."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak_total, self.peak_single, self.peak_processes = root, 0.0, 0.0, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            sizes = [pss_mb(pid) for pid in descendants(self.root)]
            self.peak_total = max(self.peak_total, sum(sizes))
            self.peak_single = max(self.peak_single, max(sizes, default=0.0))
            self.peak_processes = max(self.peak_processes, len(sizes))


def child(partition: str, seed: str, out: str, per_round: int, rounds: int, profile: str) -> None:
    """Run one simulation in this process with its ServerApp's run_server under cProfile."""
    import cProfile

    import fedasr.fl.server_app as server_app
    from fedasr.fl.simulation import federate

    original = server_app.run_server

    def profiled(*args, **kwargs):
        profiler = cProfile.Profile()
        profiler.enable()  # in the ServerApp's own thread
        try:
            return original(*args, **kwargs)
        finally:
            profiler.disable()
            profiler.dump_stats(profile)

    server_app.run_server = profiled
    overrides = {"mode": "cross-device", "rounds": rounds, "local_epochs": 1, "batch_size": 4,
                 "clients_per_round": per_round, "strategy": {"name": "fedavg"}, "annealing": {"enabled": False},
                 "evaluation": {"dev_max_utterances": 8, "test_decoding": "greedy"}}
    federate(REPO / "hparams/fl/cross_device.yaml", partition=partition, seed_checkpoint=seed, output_dir=out,
             overrides=overrides, test_manifest=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="prepared manifest folder (train.csv, dev.csv)")
    parser.add_argument("--seed-checkpoint", type=Path, help="tiny-model seed checkpoint")
    parser.add_argument("--work-dir", type=Path, default=REPO / "results" / "cross_device_scale")
    parser.add_argument("--settings", nargs="+", default=["100:20", "2000:20", "2000:50", "2000:100"],
                        help="CLIENTS:PER_ROUND pairs (default 100:20 2000:20 2000:50 2000:100)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per setting; the last one is reported")
    parser.add_argument("--top", type=int, default=12, help="profile lines to print")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child[:3], int(args.child[3]), int(args.child[4]), args.child[5])
        return 0
    if not (args.corpus and args.seed_checkpoint):
        parser.error("--corpus and --seed-checkpoint are required")
    from fedasr.data.partition import partition_manifest

    workers = os.cpu_count() or 1
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    print(f"{'clients':>7} {'per round':>9} {'round s':>8} {'compute s':>9} {'overhead s':>10} {'ms/client':>9} "
          f"{'server eval s':>13} {'peak tree MB':>12} {'largest MB':>10} {'processes':>9} {'wall s':>7}", flush=True)
    profile = None
    for clients, per_round in settings:
        partition = args.work_dir / f"partition_{clients}"
        manifests = pseudo_speaker_manifest(args.corpus, args.work_dir / f"manifests_{clients}", clients)
        partition_manifest(manifests, partition, mode="cross-device", warmup_speakers=0, min_utterances=2, seed=0)
        out = args.work_dir / f"run_{clients}_{per_round}"
        profile = args.work_dir / f"server_{clients}_{per_round}.prof"
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, __file__, "--child", str(partition), str(args.seed_checkpoint),
                                    str(out), str(per_round), str(args.rounds), str(profile)],
                                   env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        memory = TreeMemory(process.pid)
        memory.start()
        _, stderr = process.communicate()
        memory.stopped.set()
        memory.join()
        if process.returncode != 0:
            raise SystemExit(f"setting {clients}:{per_round} failed:\n{stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        split = split_round(rows[-1], workers)
        print(f"{clients:>7} {per_round:>9} {split['round_s']:>8.1f} {split['client_compute_s']:>9.1f} "
              f"{split['overhead_s']:>10.1f} {1000 * split['overhead_s'] / per_round:>9.0f} {split['server_eval_s']:>13.1f} "
              f"{memory.peak_total:>12.0f} {memory.peak_single:>10.0f} {memory.peak_processes:>9} "
              f"{time.perf_counter() - started:>7.0f}", flush=True)
    if profile is not None:
        print(f"\nServerApp profile of the last setting ({profile}), by cumulative time:")
        stats = pstats.Stats(str(profile))
        stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
