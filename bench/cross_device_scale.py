"""Cross-device scale: round time and memory as clients, clients per round and audio per client grow.

Each setting is one real `federate` simulation (tiny model, Ray on loopback, FedAvg, 1 local epoch on pseudo-speaker
clients of --clips-per-client real clips each, 10 % of them held out as the client's validation) in a child process
whose ServerApp is profiled with cProfile. Per setting it reports:
  - the last round's split (as bench/fl_overhead.py): client compute = summed fit seconds / parallel workers,
    overhead = send+receive+aggregate - client compute, and the overhead per sampled client;
  - the peak memory of the whole process tree (driver + Ray's daemons and workers), sampled every 0.5 s: the sum of
    PSS (a shared page split between the processes mapping it), and "alone", the estimate for the tree alone on the
    machine (PSS falls when other programs map the same libraries: see TreeMemory); and the peak of each process
    ROLE, told apart by /proc/PID/cmdline (driver = ServerApp + Flower's engine, Ray GCS, raylet, Ray's API server,
    dashboard agent, runtime-env agent, log monitor, autoscaler monitor, each Ray worker);
  - the reference of the memory target, "one client's training process": the peak RSS of a plain Python process
    (no Ray, no Flower) that builds the tiny system from the seed and trains one client's partition for 1 epoch;
    and, per clips-per-client value, fedasr's client function (load the global weights, fit, build the reply) timed
    against its fit alone: the client-side share of compute;
  - the server functions with the most cumulative time in the last setting (where the time goes).

    .venv/bin/python bench/cross_device_scale.py --corpus DIR --seed-checkpoint DIR --work-dir DIR
    .venv/bin/python bench/cross_device_scale.py ... --settings 100:20 2000:20 10000:20    # memory vs clients
    .venv/bin/python bench/cross_device_scale.py ... --settings 2000:10 2000:20 2000:50 2000:100  # scaling curve
    .venv/bin/python bench/cross_device_scale.py ... --settings 2000:20 --clips-per-client 2 8 32  # audio per client
    .venv/bin/python bench/cross_device_scale.py ... --settings 100:20 \\
        --variants 'fedasr={}' 'no-prestart={"init_args": {"_system_config": {"enable_worker_prestart": false}}}'

A variant is NAME=JSON with "init_args" (merged into the Ray init args fedasr gives Flower; null drops a key) and
"env" (environment of the run): every setting runs once per variant, so settings are compared within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fl_overhead import pseudo_speaker_manifest, split_round  # noqa: E402

HPARAMS = REPO / "hparams/fl/cross_device.yaml"
RUN_OVERRIDES = {"mode": "cross-device", "local_epochs": 1, "batch_size": 4, "strategy": {"name": "fedavg"},
                 "annealing": {"enabled": False}, "evaluation": {"dev_max_utterances": 8, "test_decoding": "greedy"}}

# (text in /proc/PID/cmdline, role): the first match wins. Ray renames its Python daemons and workers "ray::NAME".
ROLES = (
    ("gcs_server", "Ray GCS"),
    ("raylet/raylet", "raylet"),
    ("ray::DashboardAgent", "dashboard agent"),
    ("dashboard/agent.py", "dashboard agent"),
    ("dashboard/dashboard.py", "Ray API server (dashboard.py --minimal)"),
    ("ray::RuntimeEnvAgent", "runtime-env agent"),
    ("runtime_env/agent", "runtime-env agent"),
    ("log_monitor.py", "log monitor"),
    ("autoscaler/_private/monitor.py", "autoscaler monitor"),
    ("ray::", "Ray worker"),
    ("default_worker.py", "Ray worker"),
)


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


def memory_mb(pid: int) -> dict:
    """PSS, its anonymous part (heap, tensors: private to the process) and the file-backed RSS (libraries), in MB."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Anon", "Pss_Shmem", "Anonymous"):
                fields[key] = int(value.split()[0]) / 1024
    except (OSError, ValueError):
        pass
    if "Pss" not in fields:
        return {"pss": 0.0, "anon": 0.0, "file_rss": 0.0}
    return {"pss": fields["Pss"], "anon": fields.get("Pss_Anon", 0.0) + fields.get("Pss_Shmem", 0.0),
            "file_rss": fields["Rss"] - fields.get("Anonymous", 0.0)}


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def role_of(pid: int, root: int) -> str:
    if pid == root:
        return "driver (ServerApp + Flower engine)"
    command = command_line(pid)
    for text, role in ROLES:
        if text in command:
            return role
    if not command:
        return ""  # the process has just exited
    scripts = [Path(token).name for token in command.split(" ") if token.endswith(".py")]
    return f"other: {(scripts or [Path(command.split(' ')[0]).name])[0]}"


class TreeMemory(threading.Thread):
    """Samples the memory of every process of a tree until stopped; keeps the peaks of the tree, of each role (the
    role's processes summed) and of each Ray worker.

    PSS splits a shared page between all processes mapping it, inside the tree or not: when other programs on the
    machine map the same torch and Ray libraries, the tree's PSS sum falls. ``peak_alone`` is the estimate of the
    tree alone on the machine: its anonymous pages (never shared with outsiders) + the file-backed pages of its
    largest mapper of libraries (every process maps the same venv files; a lower bound of their union).
    """

    def __init__(self, root: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_total, self.peak_alone, self.peak_anon, self.peak_single, self.peak_processes = 0.0, 0.0, 0.0, 0.0, 0
        self.role_peak: dict[str, tuple[float, float]] = {}  # role -> (peak PSS, peak anonymous PSS)
        self.role_processes: dict[str, int] = {}
        self.worker_peak: dict[int, tuple[float, str]] = {}
        self.stopped = threading.Event()

    def sample(self) -> None:
        sizes, by_role, counts = [], {}, {}
        for pid in descendants(self.root):
            size, role = memory_mb(pid), role_of(pid, self.root)
            if not role:
                continue
            sizes.append(size)
            pss, anon = by_role.get(role, (0.0, 0.0))
            by_role[role] = (pss + size["pss"], anon + size["anon"])
            counts[role] = counts.get(role, 0) + 1
            if role == "Ray worker":
                title = command_line(pid).split(" ")[0]
                self.worker_peak[pid] = (max(size["pss"], self.worker_peak.get(pid, (0.0, ""))[0]), title)
        anon = sum(s["anon"] for s in sizes)
        self.peak_total = max(self.peak_total, sum(s["pss"] for s in sizes))
        self.peak_anon = max(self.peak_anon, anon)
        self.peak_alone = max(self.peak_alone, anon + max((s["file_rss"] for s in sizes), default=0.0))
        self.peak_single = max(self.peak_single, max((s["pss"] for s in sizes), default=0.0))
        self.peak_processes = max(self.peak_processes, len(sizes))
        for role, (pss, anon) in by_role.items():
            old_pss, old_anon = self.role_peak.get(role, (0.0, 0.0))
            self.role_peak[role] = (max(pss, old_pss), max(anon, old_anon))
            self.role_processes[role] = max(counts[role], self.role_processes.get(role, 0))

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def breakdown(self) -> dict:
        return {"roles": {role: {"peak_pss_mb": round(pss, 1), "peak_anon_mb": round(anon, 1),
                                 "processes": self.role_processes[role]}
                          for role, (pss, anon) in sorted(self.role_peak.items(), key=lambda item: -item[1][0])},
                "workers": [{"pid": pid, "title": title, "peak_pss_mb": round(size, 1)}
                            for pid, (size, title) in sorted(self.worker_peak.items())]}


def own_memory_mb() -> dict:
    """This process's memory now (see :func:`memory_mb`) and its peak RSS (VmHWM: all it maps, as if alone), in MB."""
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return {**memory_mb(os.getpid()), "hwm_mb": int(hwm.split()[1]) / 1024}


def reference_child(spec: dict) -> None:
    """One client's training process without Ray or Flower: build the system from the seed, train client 0 once."""
    import torch

    from fedasr.data.partition import load_partition
    from fedasr.fl.config import import_system_class, load_fl_config

    config = load_fl_config(HPARAMS, RUN_OVERRIDES)
    torch.set_num_threads(config.client_threads)
    client = load_partition(spec["partition"])["clients"][0]
    system = import_system_class(config.system).from_checkpoint(spec["seed"], overrides=config.system_overrides or None)
    started = time.perf_counter()
    result = system.fit(client["train"], epochs=1, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
                        optimizer=config.client_optimizer.name, momentum=config.client_optimizer.momentum)
    report = {"fit_s": time.perf_counter() - started, "utterances": result.num_examples, **own_memory_mb()}
    Path(spec["out"]).write_text(json.dumps(report))


def client_path_child(spec: dict) -> None:
    """Time fedasr's whole client function (load the global weights, fit, build the reply) against its fit alone,
    on clients 1-5 with the system already built (as in a Ray worker after its first client): the client-side
    share of compute. Flower's and Ray's own work around the call is not in it (it is in the round's overhead)."""
    from fedasr.fl.arrays import state_to_arrayrecord
    from fedasr.fl.client_app import cached_system, train_on_partition
    from fedasr.fl.simulation import resolve_run
    from fedasr.fl.protocol import FIT_SECONDS

    run = resolve_run(HPARAMS, partition=spec["partition"], seed_checkpoint=spec["seed"], output_dir=spec["out_dir"],
                      overrides={**RUN_OVERRIDES, "rounds": 1, "clients_per_round": 1}, test_manifest=None)
    config = run.round_config(1, run.config.lr)
    cached = cached_system(str(config["system"]), str(config["seed-checkpoint"]), str(config["system-overrides"]))
    arrays = state_to_arrayrecord(cached.system.state_dict())  # the seed as the global model
    train_on_partition(arrays, config, spec["partition"], 0)  # the first client (first-batch warm-up): not timed
    calls = []
    for client in range(1, 6):
        started = time.perf_counter()
        _, metrics = train_on_partition(arrays, config, spec["partition"], client)
        calls.append({"total_s": time.perf_counter() - started, "fit_s": float(metrics[FIT_SECONDS])})
    Path(spec["out"]).write_text(json.dumps(calls))


def run_child(spec: dict) -> None:
    """Run one simulation in this process with its ServerApp's run_server under cProfile."""
    import cProfile

    import fedasr.fl.server_app as server_app
    import fedasr.fl.simulation as simulation
    from fedasr.fl.simulation import federate

    original_run, original_backend = server_app.run_server, simulation.backend_config

    def profiled(*args, **kwargs):
        profiler = cProfile.Profile()
        profiler.enable()  # in the ServerApp's own thread
        try:
            return original_run(*args, **kwargs)
        finally:
            profiler.disable()
            profiler.dump_stats(spec["profile"])

    def backend_with_variant(config):
        backend = original_backend(config)
        for key, value in spec["init_args"].items():
            if value is None:
                backend["init_args"].pop(key, None)
            else:
                backend["init_args"][key] = value
        return backend

    server_app.run_server = profiled
    simulation.backend_config = backend_with_variant
    overrides = {**RUN_OVERRIDES, "rounds": spec["rounds"], "clients_per_round": spec["per_round"]}
    federate(HPARAMS, partition=spec["partition"], seed_checkpoint=spec["seed"], output_dir=spec["out"],
             overrides=overrides, test_manifest=None)


def run_measured(spec: dict, env: dict, interval: float = 0.5) -> TreeMemory:
    """Run a child of this script on ``spec``, sampling its process tree's memory; raise with its stderr if it fails."""
    process = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(process.pid, interval)
    memory.start()
    _, stderr = process.communicate()
    memory.stopped.set()
    memory.join()
    if process.returncode != 0:
        raise SystemExit(f"{spec.get('name', 'child')} failed:\n{stderr[-3000:]}")
    return memory


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition("=")
    try:
        variant = json.loads(body or "{}")
    except json.JSONDecodeError as err:
        raise SystemExit(f"--variants {text!r}: not NAME=JSON ({err}). Example: 'fedasr={{}}'") from err
    unknown = set(variant) - {"init_args", "env"}
    if not name or unknown:
        raise SystemExit(f"--variants {text!r}: give NAME=JSON with only the keys init_args and env "
                         f"(got {sorted(unknown)})")
    env = {key: str(value) for key, value in variant.get("env", {}).items()}
    return name, {"init_args": variant.get("init_args", {}), "env": env}


def print_breakdown(label: str, reference_mb: float, entry: dict) -> None:
    print(f"  {label}: tree PSS {entry['peak_tree_pss_mb']:.0f} MB, alone {entry['peak_tree_alone_mb']:.0f} MB = "
          f"{entry['peak_tree_alone_mb'] / reference_mb:.2f} x one client's training process ({reference_mb:.0f} MB)")
    for role, peaks in entry["memory"]["roles"].items():
        print(f"    {role:<42} {peaks['processes']:>3} process(es) PSS {peaks['peak_pss_mb']:>6.0f} MB, "
              f"anonymous {peaks['peak_anon_mb']:>6.0f} MB")
    for worker in entry["memory"]["workers"]:
        print(f"      worker pid {worker['pid']:<8} {worker['title']:<28} PSS {worker['peak_pss_mb']:>6.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="prepared manifest folder (train.csv, dev.csv)")
    parser.add_argument("--seed-checkpoint", type=Path, help="tiny-model seed checkpoint")
    parser.add_argument("--work-dir", type=Path, default=REPO / "results" / "cross_device_scale")
    parser.add_argument("--settings", nargs="+", default=["100:20", "2000:20", "2000:50", "2000:100"],
                        help="CLIENTS:PER_ROUND pairs (default 100:20 2000:20 2000:50 2000:100)")
    parser.add_argument("--clips-per-client", type=int, nargs="+", default=[2],
                        help="real clips per pseudo-speaker client (each setting runs once per value; default 2)")
    parser.add_argument("--variants", nargs="+", default=["fedasr={}"],
                        help="NAME=JSON Ray settings to compare (see the module doc); default: fedasr's own")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per setting; the last one is reported")
    parser.add_argument("--top", type=int, default=12, help="profile lines to print")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        {"reference": reference_child, "client-path": client_path_child, "run": run_child}[spec["kind"]](spec)
        return 0
    if not (args.corpus and args.seed_checkpoint):
        parser.error("--corpus and --seed-checkpoint are required")
    from fedasr.data.partition import partition_manifest
    from fedasr.fl.metrics_log import METRICS_FILE, read_metrics_rows
    from fedasr.utils.io import atomic_write_json

    workers = os.cpu_count() or 1
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings]
    variants = dict(parse_variant(v) for v in args.variants)
    base_env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "OMP_NUM_THREADS": "1"}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpu_count": workers, "load_average_start": os.getloadavg(), "settings": []}

    def partition_for(clients: int, clips: int) -> Path:
        partition = args.work_dir / f"partition_{clients}x{clips}"
        manifests = pseudo_speaker_manifest(args.corpus, args.work_dir / f"manifests_{clients}x{clips}", clients, clips)
        partition_manifest(manifests, partition, mode="cross-device", warmup_speakers=0, min_utterances=2, seed=0)
        return partition

    print("one client's training process (no Ray, no Flower: build the tiny system from the seed, 1 epoch), and "
          "fedasr's client function against its fit (clients 1-5, system built):")
    references = {}
    for clips in args.clips_per_client:
        partition = str(partition_for(settings[0][0], clips))
        out = args.work_dir / f"reference_{clips}.json"
        spec = {"kind": "reference", "name": "reference", "partition": partition, "seed": str(args.seed_checkpoint),
                "out": str(out)}
        sampled = run_measured(spec, base_env, interval=0.1)
        own = json.loads(out.read_text())
        spec = {**spec, "kind": "client-path", "out": str(args.work_dir / f"client_path_{clips}.json"),
                "out_dir": str(args.work_dir / "client_path_run")}
        run_measured(spec, base_env, interval=5.0)
        calls = json.loads(Path(spec["out"]).read_text())
        total, fit = sum(c["total_s"] for c in calls), sum(c["fit_s"] for c in calls)
        references[clips] = {**own, "peak_pss_mb": max(sampled.peak_total, own["pss"]), "rss_mb": own["hwm_mb"],
                             "client_call_s": total / len(calls), "client_fit_s": fit / len(calls)}
        print(f"  {clips} clips per client: peak RSS {own['hwm_mb']:.0f} MB "
              f"(PSS {references[clips]['peak_pss_mb']:.0f}, "
              f"anonymous {own['anon']:.0f}), fit {own['fit_s']:.1f} s on {own['utterances']} utterance(s) incl. "
              f"first-batch warm-up; client function {total / len(calls):.2f} s per client, of which fit "
              f"{fit / len(calls):.2f} s ({100 * fit / total:.0f} %)", flush=True)
    results["reference"] = references

    print(f"\n{'variant':>12} {'clients':>7} {'per round':>9} {'clips':>5} {'round s':>8} {'compute s':>9} "
          f"{'overhead s':>10} {'ms/client':>9} {'server eval s':>13} {'tree PSS MB':>11} {'alone MB':>8} "
          f"{'x ref':>6} {'largest MB':>10} {'processes':>9} {'wall s':>7} {'load':>5}", flush=True)
    profile = None
    for clients, per_round in settings:
        for clips in args.clips_per_client:
            partition = partition_for(clients, clips)
            for name, variant in variants.items():
                label = f"{name}_{clients}_{per_round}x{clips}"
                out = args.work_dir / f"run_{label}"
                profile = args.work_dir / f"server_{label}.prof"
                shutil.rmtree(out, ignore_errors=True)  # a fresh run: an earlier one's checkpoint would be refused
                spec = {"kind": "run", "name": label, "partition": str(partition), "seed": str(args.seed_checkpoint),
                        "out": str(out), "per_round": per_round, "rounds": args.rounds, "profile": str(profile),
                        "init_args": variant["init_args"]}
                load = os.getloadavg()[0]
                started = time.perf_counter()
                memory = run_measured(spec, {**base_env, **variant["env"]})
                wall = time.perf_counter() - started
                rows = read_metrics_rows(out / METRICS_FILE)
                split = split_round(rows[-1], workers)
                reference = references[clips]["rss_mb"]
                print(f"{name:>12} {clients:>7} {per_round:>9} {clips:>5} {split['round_s']:>8.1f} "
                      f"{split['client_compute_s']:>9.1f} {split['overhead_s']:>10.1f} "
                      f"{1000 * split['overhead_s'] / per_round:>9.0f} {split['server_eval_s']:>13.1f} "
                      f"{memory.peak_total:>11.0f} {memory.peak_alone:>8.0f} {memory.peak_alone / reference:>6.2f} "
                      f"{memory.peak_single:>10.0f} "
                      f"{memory.peak_processes:>9} {wall:>7.0f} {load:>5.1f}", flush=True)
                results["settings"].append({
                    "variant": name, "clients": clients, "per_round": per_round, "clips_per_client": clips,
                    "load_average_before": load, "wall_s": round(wall, 1),
                    **{k: round(v, 3) for k, v in split.items() if k != "clients"},
                    "overhead_per_client_ms": round(1000 * split["overhead_s"] / per_round, 1),
                    "peak_tree_pss_mb": round(memory.peak_total, 1), "peak_tree_alone_mb": round(memory.peak_alone, 1),
                    "peak_tree_anon_mb": round(memory.peak_anon, 1), "largest_process_mb": round(memory.peak_single, 1),
                    "processes": memory.peak_processes, "memory": memory.breakdown(),
                })
                atomic_write_json(args.work_dir / "results.json", results)
    print("\nPeak memory per process role (a role's processes summed; the roles' peaks need not coincide in time;"
          " alone = the tree's anonymous pages + one process's library pages, see TreeMemory):")
    for entry in results["settings"]:
        label = f"{entry['variant']} {entry['clients']}:{entry['per_round']} x {entry['clips_per_client']} clips"
        print_breakdown(label, references[entry["clips_per_client"]]["rss_mb"], entry)
    if profile is not None:
        print(f"\nServerApp profile of the last setting ({profile}), by cumulative time:")
        stats = pstats.Stats(str(profile))
        stats.sort_stats("cumulative").print_stats(args.top)
    print(f"results: {args.work_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
