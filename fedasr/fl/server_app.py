"""Flower ServerApp: drives the federated rounds itself so every round can be checkpointed and resumed.

Each round: configure_train (seeded sample of clients) -> send_and_receive -> aggregate_train -> dev WER of the
global model on the server -> NewBob annealing of the client lr -> best model kept -> metrics line -> full-state
checkpoint (atomic). Initial arrays come from the warm-up seed checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedasr.fl.annealing import ClientLRAnnealer
from fedasr.fl.arrays import (
    arrayrecord_to_state, arrays_to_numpy, decode_replies, message_array_bytes, numpy_to_arrayrecord,
    state_to_arrayrecord,
)
from fedasr.fl.checkpoint import (
    CheckpointError,
    ServerState,
    capture_rng_state,
    check_resumable,
    checkpoint_path,
    load_server_state,
    load_strategy_state,
    restore_rng_state,
    save_server_state,
    strategy_state,
)
from fedasr.fl.config import FLConfig, config_from_json, import_system_class, strategy_name_and_settings
from fedasr.fl.faults import CONFIG_KEY as FAULTS_CONFIG_KEY
from fedasr.fl.metrics_log import METRICS_FILE, MetricsLog
from fedasr.fl.privacy import privacy_round_report, with_privacy
from fedasr.fl.secure import SECURE_ROUND_KEY, secure_weighted_average
from fedasr.fl.strategies import build_strategy
from fedasr.fl.strategies.replies import (
    PARTITION_ID, array_spec, missing_replies, partition_of, short_error, usable_replies,
)
from fedasr.report.round_log import write_round_logs
from fedasr.utils.io import atomic_open, atomic_write_json
from fedasr.utils.preflight import check_writable, space_for_copies

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
BEST_MODEL_FILE = "best_model.pt"
FINAL_MODEL_FILE = "final_model.pt"


@dataclass
class FederatedRun:
    """Everything the server needs: the validated settings and the run's paths."""

    config: FLConfig
    seed_checkpoint: str
    partition: str
    output_dir: str
    dev_manifest: str
    num_clients: int
    test_manifest: str = ""
    resume: bool = False
    stop_after_round: int = 0  # >0: stop cleanly after this round (resume tests, time-sliced runs)
    # Simulation: the server assigns the partition each sampled virtual node trains this round, drawn with a seed
    # of (seed, round), so the clients of a round do not depend on Flower's random node ids and a resumed run
    # trains the same clients as an uninterrupted one. Deployment (False): each SuperNode trains its own data.
    assign_partitions: bool = False
    extra: dict = field(default_factory=dict)

    def round_config(self, server_round: int, lr: float) -> ConfigRecord:
        """The ConfigRecord sent to clients for one round."""
        c = self.config
        return ConfigRecord({
            "lr": float(lr),
            "local-epochs": int(c.local_epochs),
            "batch-size": int(c.batch_size),
            "optimizer": c.client_optimizer.name,
            "momentum": float(c.client_optimizer.momentum),
            "seed": int(c.seed) * 1000 + server_round,
            "seed-checkpoint": self.seed_checkpoint,
            "partition": self.partition,
            "system": c.system,
            "system-overrides": json.dumps(c.system_overrides, sort_keys=True),
            "threads": int(c.client_threads),
            "update-encoding": c.update_encoding,
            "server-round": int(server_round),
            **({FAULTS_CONFIG_KEY: c.faults.to_json(c.seed)} if c.faults.enabled else {}),
            **({SECURE_ROUND_KEY: True} if c.secure_aggregation.enabled else {}),
        })

    def fingerprint(self) -> dict:
        """Settings that must be equal for a resume to continue the same experiment."""
        cfg = self.config.to_dict()
        cfg.pop("rounds")  # extending a run with more rounds is allowed
        cfg.pop("round_timeout")
        cfg.pop("min_clients")  # tolerance settings: may be changed to continue a run stopped by failing rounds
        cfg.pop("max_failed_rounds")
        return {"config": json.dumps(cfg, sort_keys=True), "seed_checkpoint": self.seed_checkpoint,
                "seed_checkpoint_sha256": seed_weights_sha256(self.seed_checkpoint),
                "partition": self.partition, "num_clients": self.num_clients}


def seed_weights_sha256(seed_checkpoint: str) -> str | None:
    """sha256 of the seed's weights file (None without one): a seed retrained at the same path is another run."""
    path = Path(seed_checkpoint) / "model.ckpt"
    if not path.is_file():
        return None
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is hashed again
    from fedasr.models.checkpoint import file_sha256

    return file_sha256(path)


class SortedNodeGrid:
    """A view of a Grid whose node ids come sorted, so a seeded sample is reproducible for a given set of nodes."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def get_node_ids(self):
        return sorted(self._grid.get_node_ids())

    def __getattr__(self, name):
        return getattr(self._grid, name)


def round_rng_seed(seed: int, server_round: int) -> int:
    """Seed of the client sampling of one round: independent of earlier rounds, so a resumed run samples alike."""
    return int(seed) * 100_003 + int(server_round)


def assign_partitions(messages: list[Message], seed: int, num_clients: int) -> None:
    """Give each message of a round the partition its node trains: all partitions when every client trains,
    else a sample drawn with ``seed`` (the clients then read ``partition-id`` from the round's config)."""
    if len(messages) >= num_clients:
        chosen = list(range(num_clients))
    else:
        chosen = sorted(random.Random(seed).sample(range(num_clients), len(messages)))
    for message, partition_id in zip(messages, chosen):
        content = message.content  # shared by the round's messages: give each its own config record
        config = ConfigRecord({**content["config"], PARTITION_ID: partition_id})
        message.content = RecordDict({**content, "config": config})


class GlobalModelEvaluator:
    """The server-held model: loads global arrays and measures WER (dev each round, client scoring, test)."""

    def __init__(self, system) -> None:
        self.system = system
        self.template = {k: v.detach().clone() for k, v in system.state_dict().items()}

    def initial_arrays(self) -> ArrayRecord:
        return state_to_arrayrecord(self.template)

    def full_state(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        return arrayrecord_to_state(arrays, self.template)

    def evaluate(self, arrays: ArrayRecord, manifest: str, *, decoding: str, max_utterances: int | None):
        self.system.load_state_dict(self.full_state(arrays))
        return self.system.evaluate(manifest, decoding=decoding, max_utterances=max_utterances)


def load_system(run: FederatedRun):
    system_class = import_system_class(run.config.system)
    return system_class.from_checkpoint(run.seed_checkpoint, overrides=run.config.system_overrides or None)


def run_server(grid: Grid, run: FederatedRun, system=None) -> dict:
    """All rounds of one run (or the remaining ones with ``run.resume``); returns the summary."""
    cfg = run.config
    out = Path(run.output_dir)
    check_writable(out, space_for_copies(Path(run.seed_checkpoint) / "model.ckpt", 6), what="federated output folder")
    torch.set_num_threads(max(1, int(cfg.client_threads)))
    evaluator = GlobalModelEvaluator(system if system is not None else load_system(run))
    name, settings = strategy_name_and_settings(cfg)
    score_fn = None
    if cfg.wer_source == "server":
        def score_fn(arrays: ArrayRecord) -> float:
            return evaluator.evaluate(arrays, run.dev_manifest, decoding="greedy",
                                      max_utterances=cfg.evaluation.server_wer_utterances).wer
    strategy = build_strategy(name, settings, num_clients=run.num_clients, clients_per_round=cfg.clients_per_round,
                              score_fn=score_fn)
    strategy = with_privacy(strategy, cfg.privacy, num_clients=run.num_clients, clients_per_round=cfg.clients_per_round,
                            seed=cfg.seed, server_lr=float(settings.get("server_lr", 1.0)))
    annealer = ClientLRAnnealer(cfg.lr, **vars(cfg.annealing))
    history = MetricsLog(out / METRICS_FILE)
    arrays, start_round, best = _start_or_resume(run, evaluator, strategy, annealer, history)

    last_round = cfg.rounds if not run.stop_after_round else min(cfg.rounds, run.stop_after_round)
    for server_round in range(start_round + 1, last_round + 1):
        arrays, row = _one_round(grid, run, server_round, arrays, strategy, annealer, evaluator)
        if row["dev_wer"] < best["wer"]:
            best = {"wer": row["dev_wer"], "round": server_round}
            _save_model(out / BEST_MODEL_FILE, evaluator.full_state(arrays), server_round, row["dev_wer"])
        row["best_dev_wer"], row["best_round"] = best["wer"], best["round"]
        history.append(row)
        write_round_logs(out, history.rows)  # train_log.txt + TensorBoard, rebuilt from the rows
        save_server_state(out, ServerState(
            round=server_round, arrays=arrays_to_numpy(arrays), strategy=strategy_state(strategy),
            annealer=annealer.state_dict(), rng=capture_rng_state(), best_wer=best["wer"], best_round=best["round"],
            fingerprint=run.fingerprint(),
        ))
        log.info("round %d: dev WER %.4f (best %.4f @ %d), next lr %.4g", server_round, row["dev_wer"], best["wer"],
                 best["round"], row["next_lr"])
        _stop_after_failed_rounds(history.rows, cfg, out)

    finished = last_round == cfg.rounds
    summary = {"rounds_done": max(last_round, start_round), "finished": finished, "best_dev_wer": best["wer"],
               "best_round": best["round"], "history": history.rows, "output_dir": str(out)}
    if finished:
        _save_model(out / FINAL_MODEL_FILE, evaluator.full_state(arrays), cfg.rounds, history.rows[-1]["dev_wer"])
        summary["final_dev_wer"] = history.rows[-1]["dev_wer"]
        summary["final_test_wer"] = history.rows[-1].get("test_wer")
        summary["seed_dev_wer"] = history.rows[0]["dev_wer"]
        summary["best_test_wer"] = _best_model_test_wer(run, evaluator, history.rows, best["round"])
    if cfg.privacy.enabled:
        summary["dp_epsilon"], summary["dp_delta"] = history.rows[-1].get("dp_epsilon"), cfg.privacy.delta
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def _start_or_resume(run, evaluator, strategy, annealer, history) -> tuple[ArrayRecord, int, dict]:
    out = Path(run.output_dir)
    state = load_server_state(out)
    if state is None:
        if history.path.exists():
            history.truncate(-1)
        arrays = evaluator.initial_arrays()
        random.seed(run.config.seed)
        np.random.seed(run.config.seed % 2**32)
        torch.manual_seed(run.config.seed)
        row = {"round": 0, "lr": annealer.lr, "next_lr": annealer.lr, "clients": [], "dropped": [], "failed": [],
               "round_skipped": False}
        row.update(_dev_and_test(run, evaluator, arrays, 0, force_test=True))
        history.append(row)
        # The seed competes for the best model: rounds that never beat its dev WER leave best_model.pt = the seed.
        _save_model(out / BEST_MODEL_FILE, evaluator.full_state(arrays), 0, row["dev_wer"])
        return arrays, 0, {"wer": row["dev_wer"], "round": 0}
    refuse_unless_resumable(run, state)
    load_strategy_state(strategy, state.strategy)
    annealer.load_state_dict(state.annealer)
    restore_rng_state(state.rng)
    history.truncate(state.round)
    log.info("resuming after round %d (best dev WER %.4f @ %d)", state.round, state.best_wer, state.best_round)
    return numpy_to_arrayrecord(state.arrays), state.round, {"wer": state.best_wer, "round": state.best_round}


def refuse_unless_resumable(run: FederatedRun, state: ServerState | None) -> None:
    """Raise CheckpointError when the output folder holds a run (``state``) that this one may not continue: without
    --resume, or with settings that changed. Called before anything is written into the folder, so a refused run
    leaves a finished one exactly as it was."""
    if state is None:
        return
    path = checkpoint_path(run.output_dir)
    if not run.resume:
        raise CheckpointError(f"{path}: this output folder holds a run stopped after round {state.round}. "
                              "Pass --resume to continue it, or choose another --output-dir.")
    check_resumable(state, run.fingerprint(), path)


def _one_round(grid, run, server_round, arrays, strategy, annealer, evaluator) -> tuple[ArrayRecord, dict]:
    cfg = run.config
    lr = annealer.lr
    started = time.perf_counter()
    random.seed(round_rng_seed(cfg.seed, server_round))
    messages = list(strategy.configure_train(server_round, arrays, run.round_config(server_round, lr),
                                             SortedNodeGrid(grid)))
    if run.assign_partitions:
        assign_partitions(messages, round_rng_seed(cfg.seed, server_round), run.num_clients)
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    received = time.perf_counter()
    bytes_received = sum(message_array_bytes(r) for r in replies)  # as they travelled (fp16/bf16 when encoded)
    decode_replies(replies, arrays)  # encoded updates -> fp32 weights, before any check or strategy sees them
    # Unusable replies (errors, NaN, arrays that do not fit the global model) are set aside before the strategy
    # sees them, so a round with fewer than min_clients usable ones leaves the strategy's state untouched.
    secure = cfg.secure_aggregation.enabled  # replies hold metrics only; the updates come through SecAgg+
    kept, dropped = usable_replies(replies, array_spec(arrays), sent=messages, with_arrays=not secure)
    missing = missing_replies(messages, replies, cfg.round_timeout)
    new_arrays, train_metrics, clients = None, None, []
    if len(kept) >= cfg.min_clients:
        if secure:
            new_arrays, train_metrics, protocol = _secure_aggregate(grid, run, server_round, arrays, strategy, kept)
            bytes_received += protocol["bytes_received"]
            dropped += protocol["failed"]
        else:
            new_arrays, train_metrics = strategy.aggregate_train(server_round, kept)
        dropped += list(getattr(strategy, "last_dropped", []))  # the strategy's own refusals (e.g. a NaN score)
        clients = list(getattr(strategy, "last_clients", [])) if new_arrays is not None else []
    aggregated = time.perf_counter()
    skipped = new_arrays is None
    if skipped:
        log.warning("round %d skipped: %d usable replies, min_clients is %d; the global model is kept (failures: %s)",
                    server_round, len(kept), cfg.min_clients, dropped + missing)
    else:
        arrays = new_arrays
    row = {"round": server_round, "lr": lr, "sampled": len(messages),
           "bytes_sent": sum(message_array_bytes(m) for m in messages),
           "bytes_received": bytes_received,
           "clients": clients, "dropped": [list(d) for d in dropped],
           "failed": [list(d) for d in dropped + missing], "round_skipped": skipped}
    if getattr(strategy, "last_weights", None):
        row["weights"] = [strategy.last_weights[c] for c in row["clients"] if c in strategy.last_weights]
    row.update({_train_key(k): v for k, v in dict(train_metrics or {}).items()})
    row.update(privacy_round_report(strategy, server_round))  # dp_epsilon after this round ({} without DP)
    row.update(_dev_and_test(run, evaluator, arrays, server_round))
    # A skipped round did not train: its unchanged dev WER must not count as "no improvement" for annealing.
    row["next_lr"] = annealer.lr if skipped else annealer.step(row["dev_wer"])[1]
    row["seconds"] = {"send_receive": received - started, "aggregate": aggregated - received,
                      "evaluate": time.perf_counter() - aggregated, "round": time.perf_counter() - started}
    return arrays, row


def _secure_aggregate(grid, run, server_round, arrays, strategy, replies) -> tuple[ArrayRecord | None, object, dict]:
    """The SecAgg+ step of a secure round: the strategy weighs the clients from their metrics, SecAgg+ sums the
    weighted updates they kept (fedasr/fl/secure.py); returns (new arrays or None, train metrics, protocol report)."""
    cfg = run.config
    kept, weights = strategy.client_weights(server_round, replies, with_arrays=False)
    if weights is None:
        return None, None, {"failed": [], "bytes_received": 0}
    node_weights = {m.metadata.src_node_id: float(w) for m, w in zip(kept, weights)}
    clients = {m.metadata.src_node_id: partition_of(m) for m in kept}
    result = secure_weighted_average(grid, node_weights, list(arrays.keys()), server_round, cfg.secure_aggregation,
                                     cfg.round_timeout)
    failed = [(clients.get(node, node), f"secure aggregation: {short_error(reason)}")
              for node, reason in sorted(result.failed.items())]
    report = {"failed": failed, "bytes_received": result.bytes_received}
    if result.average is None:
        strategy.last_clients = []
        return None, None, report
    # SecAgg+ divides by the summed weights of the clients that finished: those clients, renormalised.
    finished = [m for m in kept if m.metadata.src_node_id not in result.failed]
    total = sum(node_weights[m.metadata.src_node_id] for m in finished)
    strategy.last_clients = [partition_of(m) for m in finished]
    strategy.last_weights = {partition_of(m): node_weights[m.metadata.src_node_id] / total for m in finished}
    current = arrays_to_numpy(arrays)
    averaged = {key: (current[key].astype(np.float64) + result.average[key]).astype(current[key].dtype)
                for key in current}
    weights_finished = np.array([strategy.last_weights[c] for c in strategy.last_clients])
    return numpy_to_arrayrecord(strategy.apply_server_lr(averaged)), strategy.round_metrics(finished, weights_finished), report


class TooManyFailedRoundsError(RuntimeError):
    """Consecutive rounds without enough usable replies: the clients are failing, not a run to continue blindly."""


def _stop_after_failed_rounds(rows: list[dict], cfg: FLConfig, out: Path) -> None:
    """Raise once the last ``max_failed_rounds`` rounds were all skipped (called after the round's checkpoint)."""
    recent = [r for r in rows if r["round"] > 0][-cfg.max_failed_rounds:]
    if len(recent) < cfg.max_failed_rounds or not all(r.get("round_skipped") for r in recent):
        return
    failures = "; ".join(f"{client}: {reason}" for client, reason in recent[-1]["failed"][:5]) or "no client sampled"
    raise TooManyFailedRoundsError(
        f"{out}: rounds {recent[0]['round']}-{recent[-1]['round']} each had fewer than min_clients={cfg.min_clients} "
        f"usable replies (last round: {failures}). The run is checkpointed after round {recent[-1]['round']}: fix the "
        f"clients (every failure is in {out / METRICS_FILE}, key `failed`) and continue with --resume, or lower "
        "min_clients / raise max_failed_rounds / round_timeout in the fl hparams."
    )


def _train_key(metric: str) -> str:
    """Column of an aggregated training metric: train_loss, train_num_clients, train_local_wer, ..."""
    name = metric.replace("-", "_")
    return name if name.startswith("train_") else f"train_{name}"


def _dev_and_test(run, evaluator, arrays, server_round, force_test=False) -> dict:
    ev = run.config.evaluation
    dev = evaluator.evaluate(arrays, run.dev_manifest, decoding=ev.decoding, max_utterances=ev.dev_max_utterances)
    row = {"dev_wer": dev.wer, "dev_cer": dev.cer, "dev_words": dev.words}
    wants_test = force_test or server_round == run.config.rounds or (
        ev.test_every and server_round % ev.test_every == 0)
    if run.test_manifest and wants_test:
        test = evaluator.evaluate(arrays, run.test_manifest, decoding=ev.test_decoding, max_utterances=None)
        row.update({"test_wer": test.wer, "test_cer": test.cer, "test_words": test.words})
    return row


def _best_model_test_wer(run, evaluator, rows: list[dict], best_round: int) -> float | None:
    """Test WER of best_model.pt (the round chosen by dev WER): that round's own test WER when it was tested,
    else decoded now with the test decoding. None without a test manifest."""
    if not run.test_manifest:
        return None
    tested = {r["round"]: r["test_wer"] for r in rows if r.get("test_wer") is not None}
    if best_round in tested:
        return tested[best_round]
    state = torch.load(Path(run.output_dir) / BEST_MODEL_FILE, map_location="cpu", weights_only=True)["state_dict"]
    return evaluator.evaluate(state_to_arrayrecord(state), run.test_manifest,
                              decoding=run.config.evaluation.test_decoding, max_utterances=None).wer


def _save_model(path: Path, state: dict, server_round: int, dev_wer: float) -> None:
    with atomic_open(path, "wb") as handle:
        torch.save({"state_dict": state, "round": server_round, "dev_wer": dev_wer}, handle)


# ---- Flower entry point ----------------------------------------------------------------------------------------

def run_from_run_config(run_config: dict) -> FederatedRun:
    """Build the run from Flower's run config ([tool.flwr.app.config] + --run-config)."""
    from fedasr.fl.config import load_fl_config

    if run_config.get("resolved-config"):
        config = config_from_json(str(run_config["resolved-config"]))
    else:
        if not run_config.get("hparams"):
            raise ValueError("run config lacks `hparams` (path to hparams/fl/*.yaml): pass --run-config \"hparams='...'\"")
        overrides = json.loads(str(run_config.get("overrides") or "{}"))
        if run_config.get("mode"):
            overrides["mode"] = str(run_config["mode"])
        config = load_fl_config(str(run_config["hparams"]), overrides)
    missing = [k for k in ("partition", "seed-checkpoint", "output-dir", "dev-manifest") if not run_config.get(k)]
    if missing:
        raise ValueError(f"run config lacks {missing}: pass them with --run-config (see README, deployment)")
    num_clients = int(run_config.get("num-clients") or 0) or _count_clients(str(run_config["partition"]))
    return FederatedRun(
        config=config, seed_checkpoint=str(run_config["seed-checkpoint"]), partition=str(run_config["partition"]),
        output_dir=str(run_config["output-dir"]), dev_manifest=str(run_config["dev-manifest"]),
        test_manifest=str(run_config.get("test-manifest") or ""), num_clients=num_clients,
        resume=bool(run_config.get("resume", False)), stop_after_round=int(run_config.get("stop-after-round") or 0),
    )


def _count_clients(partition: str) -> int:
    from fedasr.fl.client_app import partition_clients

    return len(partition_clients(partition))


def build_server_app(run: FederatedRun | None = None, system=None) -> ServerApp:
    """A ServerApp for ``run`` (simulation from Python; ``system``: the server's model, already built) or, with
    None, one configured by Flower's run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, run if run is not None else run_from_run_config(dict(context.run_config)), system)

    return server_app


app = build_server_app()
