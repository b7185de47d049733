"""metrics.jsonl: the per-round record of a federated run, one JSON object per line (round 0 = the seed model).

Each line is a :class:`MetricsRow`. The server writes the file (fedasr/fl/server_app.py, through :class:`MetricsLog`);
``fedasr compare``, the round logs (train_log.txt, TensorBoard), the pipeline's progress lines and the benches read it
with :func:`read_metrics_rows`. The file is rewritten atomically after every round, so a reader never sees half a
line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

import numpy as np

from fedasr.utils.io import atomic_open

METRICS_FILE = "metrics.jsonl"


class RoundSeconds(TypedDict):
    """Wall time of the parts of one round, on the server."""

    send_receive: float  # from sending the round's messages to the last reply (the clients' training)
    aggregate: float  # vetting and aggregating the replies (SecAgg+ included)
    evaluate: float  # dev (and test) decoding of the new global model
    server_train: float  # the server's own fine-tuning of the aggregate (server_training only)
    round: float  # the whole round


class MetricsRow(TypedDict, total=False):
    """One line of metrics.jsonl. Round 0 (the seed model) has only round, lr, next_lr, clients, dropped, failed,
    round_skipped, the dev and test fields and best_*; a later round has the fields below that apply to its run.
    WER and CER are fractions (0.25 = 25 %); a client is its partition id (its node id in a deployment whose
    SuperNode failed before naming its partition)."""

    round: int  # the server round (0: the seed, before any federated training)
    lr: float  # the client learning rate this round was trained with
    sampled: int  # messages sent: the clients sampled this round
    bytes_sent: int  # array bytes of the messages sent (the global model, times the clients)
    bytes_received: int  # array bytes of the replies as they travelled (fp16/bf16 when encoded) + SecAgg+ traffic
    clients: list[int]  # clients whose updates are in the new global model, in aggregation order ([]: skipped)
    dropped: list[list]  # [client, reason] of the replies received but left out (error, NaN, misfit, SecAgg+ loss)
    failed: list[list]  # dropped + [client, reason] of the sampled clients that did not reply by round_timeout
    round_skipped: bool  # fewer than min_clients usable replies (or nothing aggregated): the global model is kept
    weights: list[float]  # weight of each of ``clients`` in the average (only strategies that weigh clients: the
    #                       softmax family, FedAvg, DP-FedAvg; absent for FedAdam, FedYogi, FedAvgM, FedProx)
    # Aggregated training metrics (absent in a skipped round): the strategy's MetricRecord, see train_columns.
    train_num_clients: int  # replies aggregated
    train_num_examples: int  # utterances they trained on
    train_loss: float  # train loss weighted by examples
    train_local_wer: float  # summed word errors / summed words of the clients' own validation slices (when asked)
    train_fit_seconds_sum: float  # local training seconds summed over the clients (compute)
    train_fit_seconds_max: float  # the slowest client's local training seconds
    train_max_weight: float  # largest client weight (softmax family)
    train_dropped_clients: int  # replies the strategy itself refused (softmax family: a non-finite score)
    # Client-level differential privacy (privacy.enabled only).
    dp_epsilon: float | None  # epsilon after this round at dp_delta (None: infinite, no noise)
    dp_delta: float
    dp_relation: str  # the neighbouring relation epsilon holds for: replace-one (m of N sampled) | add-or-remove-one
    dp_noise_std: float  # std of the Gaussian noise added to the average (absent in a skipped round)
    dp_max_update_norm: float  # largest L2 norm of a received update, before the server's clipping
    dp_clipped_fraction: float  # share of the received updates at the clipping norm
    # The server's own fine-tuning of the aggregate (server_training.epochs > 0; absent in a skipped round).
    server_train_loss: float  # its mean train loss
    server_train_examples: int  # utterances of the server-held manifest it trained on
    # The global model after the round, decoded on the server.
    dev_wer: float
    dev_cer: float
    dev_words: int  # reference words of the dev set decoded (evaluation.dev_max_utterances may cap it)
    test_wer: float  # test fields: round 0, the last round and every evaluation.test_every rounds, with a test set
    test_cer: float
    test_words: int
    next_lr: float  # the client learning rate the next round gets (NewBob annealing on dev_wer)
    seconds: RoundSeconds
    best_dev_wer: float  # the lowest dev_wer so far (round 0 included): best_model.pt's
    best_round: int  # the round of best_dev_wer


def train_columns(metrics: Mapping[str, object]) -> dict:
    """MetricsRow fields of a strategy's aggregated training metrics: ``num-clients`` -> ``train_num_clients``,
    ``train-loss`` -> ``train_loss`` ("-" becomes "_"; ``train_`` is put in front where missing)."""
    columns = {}
    for key, value in metrics.items():
        name = key.replace("-", "_")
        columns[name if name.startswith("train_") else f"train_{name}"] = value
    return columns


class MetricsFileError(ValueError):
    """A metrics.jsonl that cannot be read; the message names the file, the line and the fix."""


def read_metrics_rows(path: str | Path) -> list[MetricsRow]:
    """All rows of a metrics.jsonl (empty list when the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise MetricsFileError(f"{path}, line {number}: not JSON ({err}); the file is damaged: re-run the "
                                       "federated stage with --resume (it rewrites the file from its checkpoint)") from None
    return rows


class MetricsLog:
    """The rows of one run's metrics.jsonl, kept in memory and rewritten atomically on every change."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[MetricsRow] = read_metrics_rows(self.path)

    def append(self, row: MetricsRow) -> None:
        self.rows.append(row)
        self._write()

    def truncate(self, last_round: int) -> None:
        """Forget rows after ``last_round`` (a killed run may have logged a round it did not checkpoint)."""
        self.rows = [r for r in self.rows if r["round"] <= last_round]
        self._write()

    def _write(self) -> None:
        with atomic_open(self.path, "w", encoding="utf-8") as handle:
            for row in self.rows:
                handle.write(json.dumps(row, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
