"""One training round on the server, and the policy for rounds that fail.

A round: configure_train (a seeded sample of clients) -> send_and_receive -> the replies vetted once
(replies.usable_replies) -> the strategy's aggregate_round, or the SecAgg+ path (secure.secure_round) -> the
server's own fine-tuning of the aggregate when server_training asks for it -> dev (and test) WER of the new
global model -> NewBob annealing of the client lr -> its metrics.jsonl row (MetricsRow).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from flwr.app import ArrayRecord

from fedasr.fl.arrays import decode_replies, message_array_bytes
from fedasr.fl.metrics_log import METRICS_FILE, MetricsRow, train_columns
from fedasr.fl.model_average import GlobalModelAverage
from fedasr.fl.privacy import privacy_round_report
from fedasr.fl.protocol import sampling_seed, server_training_seed
from fedasr.fl.sampling import ClientSlotGrid, SortedNodeGrid, assign_partitions
from fedasr.fl.secure import secure_round
from fedasr.fl.strategies.base import RoundOutcome
from fedasr.fl.strategies.replies import array_spec, missing_replies, usable_replies

log = logging.getLogger(__name__)


def train_round(grid, run, server_round: int, arrays: ArrayRecord, strategy, annealer, evaluator,
                average: GlobalModelAverage) -> tuple[ArrayRecord, MetricsRow]:
    """Train, aggregate and evaluate one round; returns (the global arrays after it, its metrics row). The model
    evaluated is ``average``'s (the global model itself unless evaluation.ema_decay > 0): ``average.current``."""
    cfg = run.config
    lr = annealer.lr
    started = time.perf_counter()
    random.seed(sampling_seed(cfg.seed, server_round))
    # Simulation: the strategy samples from one slot per client, whatever the number of SuperNodes (sampling.py).
    view = ClientSlotGrid(grid, run.num_clients) if run.assign_partitions else SortedNodeGrid(grid)
    messages = list(strategy.configure_train(server_round, arrays, run.round_config(server_round, lr), view))
    if run.assign_partitions:
        assign_partitions(messages, sampling_seed(cfg.seed, server_round), run.num_clients)
        view.route(messages, distinct=cfg.secure_aggregation.enabled)
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    received = time.perf_counter()
    bytes_received = sum(message_array_bytes(r) for r in replies)  # as they travelled (fp16/bf16 when encoded)
    decode_replies(replies, arrays)  # encoded updates -> fp32 weights, before any check or strategy sees them
    # The one vetting of the round: unusable replies (errors, NaN, arrays that do not fit the global model) are set
    # aside before the strategy sees them, so a round with fewer than min_clients usable ones leaves the strategy's
    # state untouched.
    secure = cfg.secure_aggregation.enabled  # replies hold metrics only; the updates come through SecAgg+
    kept, refused = usable_replies(replies, array_spec(arrays), sent=messages, with_arrays=not secure)
    missing = missing_replies(messages, replies, cfg.round_timeout)
    if len(kept) < cfg.min_clients:
        outcome = RoundOutcome()
    elif secure:
        outcome, protocol_bytes = secure_round(grid, strategy, server_round, arrays, kept, cfg.secure_aggregation,
                                               cfg.round_timeout)
        bytes_received += protocol_bytes
    else:
        outcome = strategy.aggregate_round(server_round, kept)
    aggregated = time.perf_counter()
    dropped = refused + outcome.dropped
    skipped = not outcome.aggregated
    if skipped:
        log.warning("round %d skipped: %d usable replies, min_clients is %d; the global model is kept (failures: %s)",
                    server_round, len(kept), cfg.min_clients, dropped + missing)
    else:
        arrays = outcome.arrays
    server_trained = None
    if not skipped and cfg.server_training.epochs:
        arrays, server_trained = train_on_server(run, evaluator, arrays, server_round, lr)
    trained = time.perf_counter()
    row = MetricsRow(round=server_round, lr=lr, sampled=len(messages),
                     bytes_sent=sum(message_array_bytes(m) for m in messages), bytes_received=bytes_received,
                     clients=outcome.clients, dropped=[list(d) for d in dropped],
                     failed=[list(d) for d in dropped + missing], round_skipped=skipped)
    if outcome.weights:
        row["weights"] = [outcome.weights[c] for c in outcome.clients]
    row.update(train_columns(outcome.metrics or {}))
    row.update(privacy_round_report(strategy, server_round))  # dp_epsilon after this round ({} without DP)
    row.update(outcome.report)
    if server_trained is not None:
        row.update(server_train_loss=server_trained.train_loss, server_train_examples=server_trained.num_examples)
    row.update(dev_and_test(run, evaluator, average.current if skipped else average.update(arrays), server_round))
    # A skipped round did not train: its unchanged dev WER must not count as "no improvement" for annealing.
    row["next_lr"] = annealer.lr if skipped else annealer.step(row["dev_wer"])[1]
    row["seconds"] = {"send_receive": received - started, "aggregate": aggregated - received,
                      "evaluate": time.perf_counter() - trained, "round": time.perf_counter() - started}
    if server_trained is not None:
        row["seconds"]["server_train"] = trained - aggregated
    return arrays, row


def train_on_server(run, evaluator, arrays: ArrayRecord, server_round: int, lr: float):
    """The aggregated model fine-tuned on the server's own data (server_training): (new arrays, its FitResult).

    As a client trains: a fresh optimizer of the clients' kind, seeded per round (a resumed run trains alike); the lr
    is the round's annealed client lr unless server_training.lr fixes one."""
    cfg = run.config
    settings = cfg.server_training
    return evaluator.train(arrays, settings.manifest, epochs=int(settings.epochs),
                           lr=float(settings.lr if settings.lr is not None else lr),
                           batch_size=int(settings.batch_size or cfg.batch_size),
                           seed=server_training_seed(cfg.seed, server_round), optimizer=cfg.client_optimizer.name,
                           momentum=float(cfg.client_optimizer.momentum))


def dev_and_test(run, evaluator, arrays: ArrayRecord, server_round: int, force_test: bool = False) -> MetricsRow:
    """The dev fields of a round's row, and the test fields when this round is tested."""
    ev = run.config.evaluation
    dev = evaluator.evaluate(arrays, run.dev_manifest, decoding=ev.decoding, max_utterances=ev.dev_max_utterances)
    row = MetricsRow(dev_wer=dev.wer, dev_cer=dev.cer, dev_words=dev.words)
    wants_test = force_test or server_round == run.config.rounds or (
        ev.test_every and server_round % ev.test_every == 0)
    if run.test_manifest and wants_test:
        test = evaluator.evaluate(arrays, run.test_manifest, decoding=ev.test_decoding, max_utterances=None)
        row.update(test_wer=test.wer, test_cer=test.cer, test_words=test.words)
    return row


class TooManyFailedRoundsError(RuntimeError):
    """Consecutive rounds without enough usable replies: the clients are failing, not a run to continue blindly."""


def stop_after_failed_rounds(rows: list[MetricsRow], cfg, out: Path) -> None:
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
