"""What every fedasr strategy does with client replies before aggregating them.

- replies are put in a fixed order (by the client's partition id) so float sums do not depend on arrival order;
- a reply whose arrays or train loss are not finite (a diverged client) is dropped, counted and logged;
- training metrics are aggregated as a user expects: train loss weighted by examples, WER from summed word
  errors over summed words (never an average of per-client WERs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from flwr.app import Message, MetricRecord, RecordDict

from fedasr.fl.arrays import all_finite

log = logging.getLogger(__name__)

# Keys of the MetricRecord a fedasr client returns after training.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
PARTITION_ID = "partition-id"
LOCAL_WER = "wer"
LOCAL_WORD_ERRORS = "word-errors"
LOCAL_WORDS = "words"
FIT_SECONDS = "fit-seconds"


def reply_metrics(message: Message) -> MetricRecord:
    return next(iter(message.content.metric_records.values()))


def reply_arrays(message: Message):
    return next(iter(message.content.array_records.values()))


def partition_of(message: Message) -> int:
    """The client's partition id when it reports one, else its node id (stable order either way)."""
    metrics = reply_metrics(message)
    return int(metrics.get(PARTITION_ID, message.metadata.src_node_id))


def why_unusable(message: Message) -> str | None:
    """None for a usable training reply, else the reason it must be dropped."""
    if message.has_error():
        return f"error reply ({message.error.reason})"
    if len(message.content.array_records) != 1 or len(message.content.metric_records) != 1:
        return "reply lacks exactly one ArrayRecord and one MetricRecord"
    metrics = reply_metrics(message)
    if NUM_EXAMPLES not in metrics or float(metrics[NUM_EXAMPLES]) <= 0:
        return f"reply reports no {NUM_EXAMPLES}"
    for key in (TRAIN_LOSS, LOCAL_WER):
        if key in metrics and not math.isfinite(float(metrics[key])):
            return f"{key} is {metrics[key]}"
    if not all_finite(reply_arrays(message)):
        return "arrays hold NaN or infinity (diverged local training)"
    return None


def usable_replies(replies: Iterable[Message]) -> tuple[list[Message], list[tuple[int, str]]]:
    """(usable replies sorted by partition id, [(partition or node id, reason)] of the dropped ones)."""
    kept, dropped = [], []
    for message in replies:
        reason = why_unusable(message)
        if reason is None:
            kept.append(message)
        else:
            ident = message.metadata.src_node_id if message.has_error() else _safe_partition(message)
            dropped.append((ident, reason))
            log.warning("dropping reply from client %s: %s", ident, reason)
    kept.sort(key=partition_of)
    return kept, dropped


def _safe_partition(message: Message) -> int:
    try:
        return partition_of(message)
    except (StopIteration, ValueError, TypeError):
        return message.metadata.src_node_id


def aggregate_train_metrics(records: list[RecordDict], weighted_by_key: str = NUM_EXAMPLES) -> MetricRecord:
    """Train loss weighted by examples; local WER as summed errors / summed words; totals of examples, time."""
    metrics = [next(iter(record.metric_records.values())) for record in records]
    examples = [float(m[weighted_by_key]) for m in metrics]
    total = sum(examples)
    out = MetricRecord({"num-clients": len(metrics), "num-examples": int(total)})
    if metrics and all(TRAIN_LOSS in m for m in metrics) and total > 0:
        out[TRAIN_LOSS] = sum(float(m[TRAIN_LOSS]) * n for m, n in zip(metrics, examples)) / total
    if metrics and all(LOCAL_WORDS in m and LOCAL_WORD_ERRORS in m for m in metrics):
        words = sum(int(m[LOCAL_WORDS]) for m in metrics)
        errors = sum(int(m[LOCAL_WORD_ERRORS]) for m in metrics)
        out["local-wer"] = errors / words if words else float("nan")
    if metrics and all(FIT_SECONDS in m for m in metrics):
        out["fit-seconds-sum"] = sum(float(m[FIT_SECONDS]) for m in metrics)
        out["fit-seconds-max"] = max(float(m[FIT_SECONDS]) for m in metrics)
    return out


class RobustRepliesMixin:
    """Put before a Flower strategy class: drops unusable replies and fixes their order before it aggregates."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        kept, dropped = usable_replies(replies)
        self.last_dropped = dropped
        self.last_clients = [partition_of(m) for m in kept]
        if not kept:
            log.warning("round %d: no usable reply, the global model is kept", server_round)
            return None, None
        return super().aggregate_train(server_round, kept)
