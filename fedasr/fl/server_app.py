"""Flower ServerApp: drives the federated rounds itself so every round can be checkpointed and resumed.

The run loop is here: round 0 (the seed model) or the state of a resumed run, then per round
fedasr/fl/round.py's train_round -> best model kept -> metrics row appended -> full-state checkpoint (atomic)
-> the failed-rounds policy; at the end the final model and summary.json. Where the rest lives: the run's
settings in run.py, the server's model in evaluator.py, client sampling in sampling.py, the messages and seeds in
protocol.py, the metrics row in metrics_log.py, the checkpoint in checkpoint.py, SecAgg+ in secure.py.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedasr.fl.annealing import ClientLRAnnealer
from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord, state_to_arrayrecord
from fedasr.fl.checkpoint import (
    ServerState,
    ServerStateError,
    capture_rng_state,
    check_resumable,
    checkpoint_path,
    load_server_state,
    restore_rng_state,
    restore_strategy_state,
    save_server_state,
)
from fedasr.fl.config import strategy_name_and_settings
from fedasr.fl.evaluator import GlobalModelEvaluator, load_system
from fedasr.fl.metrics_log import METRICS_FILE, MetricsLog, MetricsRow
from fedasr.fl.model_average import GlobalModelAverage
from fedasr.fl.privacy import with_privacy
from fedasr.fl.round import dev_and_test, stop_after_failed_rounds, train_round
from fedasr.fl.run import FederatedRun, run_from_run_config
from fedasr.fl.run_folder import (BEST_MODEL_FILE, FINAL_MODEL_FILE, RESOLVED_CONFIG_FILE, SUMMARY_FILE,
                                 load_model_file, save_model_file)
from fedasr.fl.sampling import is_simulation_grid, wait_for_nodes
from fedasr.fl.strategies import build_strategy
from fedasr.report.round_log import RoundLogs
from fedasr.utils.io import atomic_write_json
from fedasr.utils.preflight import check_writable, space_for_copies

log = logging.getLogger(__name__)



def check_output_folder(run: FederatedRun, what: str = "federated output folder") -> None:
    """A writable output folder with room for the run's model copies (checked once, before anything is written)."""
    check_writable(Path(run.output_dir), space_for_copies(Path(run.seed_checkpoint) / "model.ckpt", 6), what=what)


def start_run_folder(run: FederatedRun) -> None:
    """What every federated run writes before its first round (``fedasr federate`` and ``flwr run``): a stale
    summary.json removed (it must not pass for this run's) and fl_config.json, the resolved settings that
    ``fedasr compare`` / ``evaluate`` read. Call after :func:`refuse_unless_resumable`."""
    out = Path(run.output_dir)
    summary_path = out / SUMMARY_FILE
    if summary_path.exists():
        summary_path.unlink()
    atomic_write_json(out / RESOLVED_CONFIG_FILE, {
        "config": run.config.to_dict(), "seed_checkpoint": run.seed_checkpoint, "partition": run.partition,
        "dev_manifest": run.dev_manifest, "test_manifest": run.test_manifest, "num_clients": run.num_clients,
    })


def run_server(grid: Grid, run: FederatedRun, system=None, *, check_output: bool = True) -> dict:
    """All rounds of one run (or the remaining ones with ``run.resume``); returns the summary.

    ``system``: the server's model, already built (else built here); ``check_output=False``: the caller checked the
    output folder already (the simulation does, before Ray starts)."""
    cfg = run.config
    out = Path(run.output_dir)
    if check_output:
        check_output_folder(run)
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
    arrays, start_round, best, average = _start_or_resume(run, evaluator, strategy, annealer, history)

    last_round = cfg.rounds if not run.stop_after_round else min(cfg.rounds, run.stop_after_round)
    with RoundLogs(out, history.rows, rounds=cfg.rounds) as round_logs:  # the seed's line, TensorBoard from round 0
        for server_round in range(start_round + 1, last_round + 1):
            arrays, row = train_round(grid, run, server_round, arrays, strategy, annealer, evaluator, average)
            if row["dev_wer"] < best["wer"]:
                best = {"wer": row["dev_wer"], "round": server_round}
                save_model_file(out / BEST_MODEL_FILE, evaluator.full_state(average.current), server_round,
                                row["dev_wer"])
            row["best_dev_wer"], row["best_round"] = best["wer"], best["round"]
            history.append(row)
            round_logs.write(history.rows)  # train_log.txt + this round's TensorBoard events (step = round)
            save_server_state(out, ServerState(
                round=server_round, arrays=arrays_to_numpy(arrays), strategy=strategy.state_dict(),
                annealer=annealer.state_dict(), rng=capture_rng_state(), best_wer=best["wer"], best_round=best["round"],
                fingerprint=run.fingerprint(), average=average.state_dict(),
            ))
            round_logs.announce(row)  # the round's one console line (+ progress bar on a terminal)
            stop_after_failed_rounds(history.rows, cfg, out)

    finished = last_round == cfg.rounds
    summary = {"rounds_done": max(last_round, start_round), "finished": finished, "best_dev_wer": best["wer"],
               "best_round": best["round"], "history": history.rows, "output_dir": str(out)}
    if finished:
        save_model_file(out / FINAL_MODEL_FILE, evaluator.full_state(average.current), cfg.rounds,
                        history.rows[-1]["dev_wer"])
        summary["final_dev_wer"] = history.rows[-1]["dev_wer"]
        summary["final_test_wer"] = history.rows[-1].get("test_wer")
        summary["seed_dev_wer"] = history.rows[0]["dev_wer"]
        summary["best_test_wer"] = _best_model_test_wer(run, evaluator, history.rows, best["round"])
    if cfg.privacy.enabled:
        summary["dp_epsilon"], summary["dp_delta"] = history.rows[-1].get("dp_epsilon"), cfg.privacy.delta
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def _start_or_resume(run, evaluator, strategy, annealer, history
                     ) -> tuple[ArrayRecord, int, dict, GlobalModelAverage]:
    """(global arrays, last round done, best so far, the evaluated model's average) of a fresh or resumed run."""
    out = Path(run.output_dir)
    decay = run.config.evaluation.ema_decay
    state = load_server_state(out)
    if state is None:
        if history.path.exists():
            history.truncate(-1)
        arrays = evaluator.initial_arrays()
        random.seed(run.config.seed)
        np.random.seed(run.config.seed % 2**32)
        torch.manual_seed(run.config.seed)
        row = MetricsRow(round=0, lr=annealer.lr, next_lr=annealer.lr, clients=[], dropped=[], failed=[],
                         round_skipped=False)
        row.update(dev_and_test(run, evaluator, arrays, 0, force_test=run.config.evaluation.test_seed))
        history.append(row)
        # The seed competes for the best model: rounds that never beat its dev WER leave best_model.pt = the seed.
        save_model_file(out / BEST_MODEL_FILE, evaluator.full_state(arrays), 0, row["dev_wer"])
        return arrays, 0, {"wer": row["dev_wer"], "round": 0}, GlobalModelAverage(decay, arrays)
    refuse_unless_resumable(run, state)
    restore_strategy_state(strategy, state, checkpoint_path(out))
    annealer.load_state_dict(state.annealer)
    restore_rng_state(state.rng)
    history.truncate(state.round)
    log.info("resuming after round %d (best dev WER %.4f @ %d)", state.round, state.best_wer, state.best_round)
    arrays = numpy_to_arrayrecord(state.arrays)
    return (arrays, state.round, {"wer": state.best_wer, "round": state.best_round},
            GlobalModelAverage(decay, arrays, state.average))


def refuse_unless_resumable(run: FederatedRun, state: ServerState | None) -> None:
    """Raise ServerStateError when the output folder holds a run (``state``) that this one may not continue: without
    --resume, or with settings that changed. Called before anything is written into the folder, so a refused run
    leaves a finished one exactly as it was."""
    if state is None:
        return
    path = checkpoint_path(run.output_dir)
    if not run.resume:
        raise ServerStateError(f"{path}: this output folder holds a run stopped after round {state.round}. "
                              "Pass --resume to continue it, or choose another --output-dir.")
    check_resumable(state, run.fingerprint(), path)


def _best_model_test_wer(run, evaluator, rows: list[dict], best_round: int) -> float | None:
    """Test WER of best_model.pt (the round chosen by dev WER): that round's own test WER when it was tested,
    else decoded now with the test decoding. None without a test manifest."""
    if not run.test_manifest:
        return None
    tested = {r["round"]: r["test_wer"] for r in rows if r.get("test_wer") is not None}
    if best_round in tested:
        return tested[best_round]
    state = load_model_file(Path(run.output_dir) / BEST_MODEL_FILE)
    return evaluator.evaluate(state_to_arrayrecord(state), run.test_manifest,
                              decoding=run.config.evaluation.test_decoding, max_utterances=None).wer


# ---- Flower entry point ----------------------------------------------------------------------------------------

def build_server_app(run: FederatedRun | None = None, system=None) -> ServerApp:
    """A ServerApp for ``run`` (simulation from Python; ``system``: the server's model, already built) or, with
    None, one configured by Flower's run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if run is not None:  # fedasr federate: the simulation checked the output folder before Ray started
            run_server(grid, run, system, check_output=False)
        else:
            run_from_flower(grid, run_from_run_config(dict(context.run_config), simulation=is_simulation_grid(grid)))

    return server_app


def run_from_flower(grid: Grid, run: FederatedRun) -> dict:
    """``flwr run``: the checks and files of ``fedasr federate`` (fedasr/fl/simulation.py), then the rounds, so the
    run folder is the same (fl_config.json, energy.json; compare, evaluate and resume accept it).

    Simulation: the server maps the clients onto the SuperNodes the federation has (fedasr/fl/sampling.py).
    Deployment: each SuperNode trains its own silo, so the first round waits at most ``node-wait`` seconds for
    ``clients_per_round`` of them, then stops with NotEnoughNodesError."""
    from fedasr.report.energy import track_energy

    out = Path(run.output_dir)
    check_output_folder(run, what="output-dir")
    system = load_system(run)  # a seed that does not fit the model: an error before anything is written
    refuse_unless_resumable(run, load_server_state(out))
    if not run.assign_partitions:
        needed = int(run.config.clients_per_round or run.num_clients)
        wait_for_nodes(grid, needed, run.node_wait,
                       what=" (clients_per_round)" if run.config.clients_per_round else " (num-clients)")
    start_run_folder(run)
    log.info("flwr run: %s, %d clients, %d rounds -> %s", "simulation" if run.assign_partitions else "deployment",
             run.num_clients, run.config.rounds, out)
    with track_energy(out, accumulate=run.resume):
        return run_server(grid, run, system, check_output=False)


app = build_server_app()
