"""`fedasr federate`: resolve the settings, then run the ServerApp and ClientApp on Flower's Simulation Engine.

Ray is bound to loopback; there is one virtual SuperNode per client of the partition (``partition-id`` = the
client's index); each client gets ``client_num_cpus`` CPUs (1 by default), so as many clients train at once as
there are cores. The same apps run unchanged on the Deployment Engine (see README: ``flwr run . <federation>``).

Logging (:func:`federate_logging`): everything (Flower's DEBUG lines, Ray's and Python's warnings included) goes to
``<output-dir>/log.txt``; the console keeps fedasr's own lines (one per round), errors and the warnings that need
the user, each once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from fedasr.fl.checkpoint import load_server_state
from fedasr.fl.config import FLConfig, FLConfigError, load_fl_config, server_training_manifest
from fedasr.fl.evaluator import load_system
from fedasr.fl.run import FederatedRun
from fedasr.fl.flower_compat import without_flower_console, without_run_simulation_notice
from fedasr.fl.run_folder import SUMMARY_FILE
from fedasr.fl.server_app import build_server_app, check_output_folder, refuse_unless_resumable, start_run_folder
from fedasr.report.energy import track_energy
from fedasr.utils.io import read_json

log = logging.getLogger(__name__)

# Quiet, offline, loopback-only settings for Flower and Ray (kept when the user set them already).
_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "HF_HUB_OFFLINE": "1",
    # A client with client_num_gpus 0 sees no GPU (Ray empties its CUDA_VISIBLE_DEVICES): Ray 2.55 does this by
    # default and announces the opposite default for later versions, under which such clients would pick GPU 0.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
}


LOG_FILE = "log.txt"  # the run's full log (appended to by a resumed run), as SpeechBrain recipes keep one
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Third-party warnings that say nothing the user must act on: log.txt only.
FILE_ONLY_WARNINGS = (
    "fraction_evaluate is set to 0.0",  # Flower: fedasr evaluates the global model on the server, by design
    "Multiple instances of codecarbon",  # the energy tracker of the whole machine
    "torchvision is not available",  # SpeechBrain: figures in TensorBoard, which fedasr does not log
)
FILE_ONLY_LOGGERS = ("py.warnings",)  # Python warnings (Ray's and torch's FutureWarning tips): log.txt only


class ConsoleFilter(logging.Filter):
    """What the console shows of a federated run: fedasr's INFO lines (start, one line per round), everyone's
    errors, and third-party warnings but the known harmless ones (:data:`FILE_ONLY_WARNINGS`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.name == "fedasr" or record.name.startswith("fedasr."):
            return record.levelno >= logging.INFO
        if record.levelno < logging.WARNING or record.name in FILE_ONLY_LOGGERS:
            return False
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is shown as it is
            return True
        return not any(notice in text for notice in FILE_ONLY_WARNINGS)


class ConsoleHandler(logging.StreamHandler):
    """A console handler that writes through tqdm, so that a round progress bar stays whole below the lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as logging.StreamHandler does
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler  # basicConfig's; not a file handler, not pytest's capture


@contextlib.contextmanager
def federate_logging(output_dir: str | Path) -> Iterator[Path]:
    """The logging of one federated run while the block runs; yields the log file.

    ``<output_dir>/log.txt`` gets every record (INFO and up, Flower's DEBUG lines, Python warnings); the root's
    console handlers (``logging.basicConfig``'s, as ``fedasr`` sets up) get :class:`ConsoleFilter` and write
    through tqdm; Flower's own console handler is muted (fedasr/fl/flower_compat.py) so its lines are not printed
    twice. With debug logging on the root (``fedasr -v``) the console is not filtered. Without any handler on the
    root (the Python API, logging not configured) warnings and errors still reach stderr. Everything is restored
    at the end."""
    path = Path(output_dir) / LOG_FILE
    root = logging.getLogger()
    saved_level = root.level
    verbose = root.getEffectiveLevel() <= logging.DEBUG
    file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    consoles = [h for h in root.handlers if _is_console(h)]
    replaced = []
    for old in consoles:
        new = ConsoleHandler(old.stream)
        new.setLevel(old.level)
        new.setFormatter(old.formatter)
        if not verbose:
            new.addFilter(ConsoleFilter())
        root.removeHandler(old)
        root.addHandler(new)
        replaced.append((old, new))
    added = [file_handler]
    if not root.handlers:  # no logging configured: keep what Python's last-resort handler would show
        fallback = ConsoleHandler(sys.stderr)
        fallback.setLevel(logging.WARNING)
        fallback.addFilter(ConsoleFilter())
        added.append(fallback)
    for handler in added:
        root.addHandler(handler)
    root.setLevel(min(saved_level or logging.WARNING, logging.INFO))
    capturing = getattr(logging, "_warnings_showwarning", None) is not None
    logging.captureWarnings(True)
    try:
        with without_flower_console():
            yield path
    finally:
        if not capturing:
            logging.captureWarnings(False)
        root.setLevel(saved_level)
        for handler in added:
            root.removeHandler(handler)
            handler.close()
        for old, new in replaced:
            root.removeHandler(new)
            root.addHandler(old)


class SimulationError(RuntimeError):
    """The simulation ended without a summary (the ServerApp failed); the message says where to look."""


def default_eval_manifests(partition_dir: str | Path) -> tuple[str, str]:
    """dev.csv and test.csv beside the train manifest the partition was made from."""
    from fedasr.data.manifest import manifest_path
    from fedasr.data.partition import load_partition

    source = Path(load_partition(partition_dir)["source"]).parent
    dev, test = manifest_path(source, "dev"), manifest_path(source, "test")
    return str(dev), str(test) if test.exists() else ""


def resolve_run(
    hparams: str | Path,
    *,
    partition: str | Path,
    seed_checkpoint: str | Path,
    output_dir: str | Path,
    mode: str | None = None,
    overrides: dict | None = None,
    dev_manifest: str | Path | None = None,
    test_manifest: str | Path | None = None,
    resume: bool = False,
    stop_after_round: int = 0,
) -> FederatedRun:
    """Validated settings + absolute paths of one federated run (reads the partition, not its manifests)."""
    from fedasr.data.partition import load_partition

    overrides = dict(overrides or {})
    if mode:
        overrides["mode"] = mode
    config = load_fl_config(hparams, overrides)
    check_simulation_devices(config, source=str(hparams))  # before anything is read, written or started
    loaded = load_partition(partition)
    if loaded.get("mode") in ("cross-silo", "cross-device") and loaded["mode"] != config.mode:
        log.warning("partition %s was made for %s, the run is %s", loaded["path"], loaded["mode"], config.mode)
    num_clients = len(loaded["clients"])
    if config.clients_per_round is not None and int(config.clients_per_round) > num_clients:  # before Ray starts
        raise FLConfigError(
            f"{hparams}: clients_per_round is {config.clients_per_round} but the partition {loaded['path']} holds "
            f"{num_clients} clients: lower it (--set clients_per_round={num_clients}) or use a partition with more")
    default_dev, default_test = default_eval_manifests(partition)
    dev = Path(dev_manifest or default_dev).resolve()
    if not dev.exists():
        raise FileNotFoundError(f"{dev}: dev manifest not found (the server evaluates the global model on it). Pass --dev CSV.")
    test = Path(test_manifest).resolve() if test_manifest else (Path(default_test) if default_test else None)
    if test is not None and not test.exists():
        raise FileNotFoundError(f"{test}: test manifest not found. Pass --test CSV, or leave it out.")
    seed = Path(seed_checkpoint).resolve()
    if not seed.exists():
        raise FileNotFoundError(f"{seed}: seed checkpoint not found. Run the warm-up first (it exports the seed).")
    if config.server_training.epochs:
        config.server_training.manifest = server_training_manifest(config)
    return FederatedRun(
        config=config, seed_checkpoint=str(seed), partition=loaded["path"], output_dir=str(Path(output_dir).resolve()),
        dev_manifest=str(dev), test_manifest=str(test) if test else "", num_clients=num_clients,
        resume=resume, stop_after_round=stop_after_round, assign_partitions=True,
    )


def check_simulation_devices(config: FLConfig, source: str = "fl hparams") -> tuple[str, str]:
    """(server device, what the clients get) of a simulated run, or DeviceError / FLConfigError when this machine
    cannot meet the request: called before Ray starts, so a wrong device fails in seconds.

    The server resolves ``device`` itself. A client trains on the GPU Ray gives it (``client_num_gpus`` > 0; Ray
    sets its CUDA_VISIBLE_DEVICES) or on the CPU (``client_num_gpus`` 0: Ray hides the GPUs from it); so an
    explicit cuda request needs ``client_num_gpus`` > 0, and a GPU share needs a GPU (on a local Ray)."""
    from fedasr.utils.device import (DeviceError, check_precision, gpu_findings, parse_device, resolve_device,
                                     visible_gpus)

    server = resolve_device(config.device, what=f"{source}: device")
    check_precision(config.precision, server, what=f"{source}: precision")
    wants_gpu = parse_device(config.device)[0] == "cuda"
    gpus = float(config.client_num_gpus)
    if wants_gpu and gpus <= 0:
        raise FLConfigError(
            f"{source}: device is {config.device!r} but client_num_gpus is 0, so Ray would give the clients no GPU "
            "and they would train on the CPU: set client_num_gpus (e.g. 0.25: four clients share a GPU), or "
            "device: auto (server on the GPU, clients on the CPU)")
    if gpus > 0 and ray_address(config) is None and not server.startswith("cuda"):
        if config.device == "cpu" and visible_gpus() > 0:
            raise FLConfigError(f"{source}: device is 'cpu' but client_num_gpus is {gpus}: the clients would hold "
                                "GPU shares they do not use. Set client_num_gpus: 0, or device: cuda")
        if visible_gpus() == 0:
            raise DeviceError(f"{source}: client_num_gpus is {gpus} but this machine has no usable GPU for Ray to "
                              f"share ({gpu_findings()}): set client_num_gpus: 0 (and device: cpu or auto)")
    clients = "cpu" if gpus <= 0 or config.device == "cpu" else \
        f"a {gpus:g} share of a GPU (cuda:0 of what Ray makes visible)"
    if clients == "cpu":
        check_precision(config.precision, "cpu", what=f"{source}: precision (the clients train on the CPU)")
    log.info("devices: server %s, clients %s, precision %s", server, clients, config.precision)
    return server, clients


def ray_address(config: FLConfig) -> str | None:
    """The Ray cluster to join: ``ray_address`` of the fl hparams, else $RAY_ADDRESS, else None (start one here)."""
    return config.ray_address or os.environ.get("RAY_ADDRESS") or None


def backend_config(config: FLConfig) -> dict:
    """Ray settings of Flower's simulation backend.

    Each simulated client is a Ray task needing ``client_num_cpus`` CPUs and ``client_num_gpus`` GPUs, so
    clients in parallel = the cluster's resources / those. Without a cluster address Ray starts on this
    machine, bound to loopback, with all its cores. With one (``ray start --head`` + ``ray start --address``
    on other machines) the driver joins it and Ray spreads the clients over every node; Ray then forbids
    sizing the cluster from the driver, so only the address is passed.
    """
    resources = {"num_cpus": float(config.client_num_cpus), "num_gpus": float(config.client_num_gpus)}
    address = ray_address(config)
    if address:
        init = {"address": address, "include_dashboard": False}
    else:
        init = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "_node_ip_address": "127.0.0.1"}
    return {"client_resources": resources, "init_args": init}


def run_simulation_for(run: FederatedRun) -> dict:
    """Run all (remaining) rounds on the Simulation Engine; returns the run's summary.

    The server's model is built here, before Ray starts, so a seed checkpoint that does not fit the model is an
    error in seconds (the ServerApp then uses this one: a simulated ServerApp runs in this process)."""
    from fedasr.fl.client_app import app as client_app

    joining = ray_address(run.config) is not None
    for key, value in _ENVIRONMENT.items():
        if joining and key == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER":
            continue  # "0" means no multi-node Ray at all, and pins this driver to 127.0.0.1
        os.environ.setdefault(key, value)
    system = load_system(run)  # a seed that does not fit the model: CheckpointMismatchError, before any folder is made
    out = Path(run.output_dir)
    check_output_folder(run, what="--output-dir")  # before Ray (the ServerApp then does not check again)
    refuse_unless_resumable(run, load_server_state(out))  # before any file of a finished run is touched
    summary_path = out / SUMMARY_FILE
    start_run_folder(run)  # stale summary.json removed, fl_config.json written (as `flwr run` does)
    with federate_logging(out) as log_file:  # the full log in log.txt; the console: fedasr's lines, one per round
        log.info("%s run of %d clients, %d rounds%s -> %s (full log: %s)", run.config.mode, run.num_clients,
                 run.config.rounds, ", resumed" if run.resume else "", out, log_file.name)
        from flwr.simulation import run_simulation  # here: its import logs (alembic) go to log.txt

        try:
            # run_simulation, deprecated in Flower 1.42, is kept on purpose and only its notice dropped: `flwr run`
            # cannot run this in-process ServerApp nor report its failure as an exit code (fedasr/fl/flower_compat.py).
            with track_energy(out, accumulate=run.resume), without_run_simulation_notice():  # energy.json: whole machine
                run_simulation(server_app=build_server_app(run, system), client_app=client_app,
                               num_supernodes=run.num_clients, backend_config=backend_config(run.config))
        except RuntimeError as err:  # Flower's engine stopped (e.g. Ray could not start); its log has the cause
            raise SimulationError(
                f"the Flower simulation engine stopped ({err.__cause__ or err}); see {log_file}. Rounds completed "
                f"before are checkpointed in {out}: fix the cause and re-run with --resume"
            ) from err
    if not summary_path.exists():
        raise SimulationError(f"the simulation ended without {summary_path}: see the log above and {log_file} for "
                              "the ServerApp error")
    return read_json(summary_path)


def federate(
    hparams: str | Path,
    *,
    partition: str | Path,
    seed_checkpoint: str | Path,
    output_dir: str | Path,
    mode: str | None = None,
    overrides: dict | None = None,
    dev_manifest: str | Path | None = None,
    test_manifest: str | Path | None = None,
    resume: bool = False,
    stop_after_round: int = 0,
) -> dict:
    """Simulate a federated run on Flower's Simulation Engine (Ray); returns its summary (``summary.json``).

    ``hparams``: an fl settings file (hparams/fl/*.yaml); ``overrides``: nested changes to it; ``partition``: a
    folder from :func:`fedasr.partition_manifest`; ``seed_checkpoint``: the warm-up's exported seed; the dev set
    defaults to ``dev.csv`` beside the partition's source manifest. Every setting is checked before Ray starts.

    >>> summary = federate("hparams/fl/cross_silo.yaml", partition="out/partitions/cross-silo",  # doctest: +SKIP
    ...                    seed_checkpoint="out/runs/warmup/seed_checkpoint", output_dir="out/runs/silo",
    ...                    overrides={"rounds": 3, "strategy": {"temperature": 1.0}})
    >>> summary["best_dev_wer"], summary["best_test_wer"]  # doctest: +SKIP
    """
    return run_simulation_for(resolve_run(
        hparams, partition=partition, seed_checkpoint=seed_checkpoint, output_dir=output_dir, mode=mode,
        overrides=overrides, dev_manifest=dev_manifest, test_manifest=test_manifest, resume=resume,
        stop_after_round=stop_after_round))


def summary_line(summary: dict) -> str:
    keys = ("rounds_done", "finished", "seed_dev_wer", "final_dev_wer", "best_dev_wer", "best_round", "final_test_wer")
    return json.dumps({k: summary.get(k) for k in keys})
