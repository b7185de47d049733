"""The vetting of client replies, done once per round before any strategy sees them (and the metrics they carry).

- replies are put in a fixed order (by the client's partition id) so float sums do not depend on arrival order;
- a reply whose arrays or train loss are not finite (a diverged client), or whose arrays do not fit the global
  model (other keys, shapes, or non-float dtypes: a client built from another model, a corrupted upload), is
  dropped, counted and logged with its reason, so nothing that would poison the average is aggregated;
- a sent message without a reply by the round deadline is listed as missing (Flower's ``send_and_receive``
  returns fewer replies then, no error replies);
- training metrics are aggregated as a user expects: train loss weighted by examples, WER from summed word
  errors over summed words (never an average of per-client WERs).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedasr.fl.arrays import all_finite
from fedasr.fl.protocol import (
    FIT_GPU_PEAK_MIB, FIT_SECONDS, LOCAL_WER, LOCAL_WORD_ERRORS, LOCAL_WORDS, NUM_EXAMPLES, PARTITION_ID, TRAIN_LOSS,
)

log = logging.getLogger(__name__)



def reply_metrics(message: Message) -> MetricRecord:
    return next(iter(message.content.metric_records.values()))


def reply_arrays(message: Message):
    return next(iter(message.content.array_records.values()))


def partition_of(message: Message) -> int:
    """The client's partition id when it reports one, else its node id (stable order either way)."""
    metrics = reply_metrics(message)
    return int(metrics.get(PARTITION_ID, message.metadata.src_node_id))


ArraySpec = dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype name) of the global model's arrays
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # what a reply's arrays may hold


def array_spec(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> ArraySpec:
    """Keys, shapes and dtypes of the global arrays: what every reply must match (no array data is read)."""
    return {key: (tuple(int(n) for n in value.shape), str(value.dtype)) for key, value in arrays.items()}


def why_arrays_do_not_fit(arrays: ArrayRecord, expected: ArraySpec) -> str | None:
    """None when ``arrays`` have the global model's keys and shapes and floating-point dtypes, else what differs.

    The dtype may differ from the global one as long as it is floating point (an encoding that sends fp16 is
    cast back on aggregation); an integer, boolean or object array is refused.
    """
    got = array_spec(arrays)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        return f"arrays do not match the global model: missing keys {missing[:3]}, unexpected keys {extra[:3]}"
    for key, (shape, _) in expected.items():
        if got[key][0] != shape:
            return f"array {key!r} has shape {got[key][0]}, the global model has {shape}"
        if got[key][1] not in FLOAT_DTYPES:
            return f"array {key!r} has dtype {got[key][1]}, a floating-point dtype is required"
    return None


def short_error(reason: str | None, limit: int = 300) -> str:
    """The informative part of an error reply's reason, one line: Flower's simulation wraps a ClientApp's
    exception in Ray's multi-line traceback ending with "... Message: <the exception's text>'>)"."""
    text = str(reason or "no reason given")
    if "Message: " in text:
        text = re.sub(r"'>\)?\s*$", "", text.rsplit("Message: ", 1)[1])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[-1] if lines else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def why_unusable(message: Message, expected: ArraySpec | None = None, with_arrays: bool = True) -> str | None:
    """None for a usable training reply, else the reason it must be dropped (``expected``: see array_spec).

    ``with_arrays=False``: a reply of a secure-aggregation round, which must carry metrics and no arrays.
    """
    if message.has_error():
        return f"error reply ({short_error(message.error.reason)})"
    if len(message.content.array_records) != int(with_arrays) or len(message.content.metric_records) != 1:
        return ("reply lacks exactly one ArrayRecord and one MetricRecord" if with_arrays else
                "a secure-aggregation reply must hold one MetricRecord and no arrays")
    metrics = reply_metrics(message)
    if NUM_EXAMPLES not in metrics or float(metrics[NUM_EXAMPLES]) <= 0:
        return f"reply reports no {NUM_EXAMPLES}"
    for key in (TRAIN_LOSS, LOCAL_WER):
        if key in metrics and not math.isfinite(float(metrics[key])):
            return f"{key} is {metrics[key]}"
    if not with_arrays:
        return None
    if expected is not None:
        misfit = why_arrays_do_not_fit(reply_arrays(message), expected)
        if misfit:
            return misfit
    if not all_finite(reply_arrays(message)):
        return "arrays hold NaN or infinity (diverged local training)"
    return None


def usable_replies(
    replies: Iterable[Message], expected: ArraySpec | None = None, sent: Iterable[Message] = (),
    with_arrays: bool = True,
) -> tuple[list[Message], list[tuple[int, str]]]:
    """(usable replies sorted by partition id, [(client, reason)] of the dropped ones).

    The client of a dropped reply is its reported partition id; for an error reply (no content), the partition
    the server gave the message it answers (``sent``, see :func:`sent_clients`), else its node id.
    """
    clients = sent_clients(sent)
    kept, dropped = [], []
    for message in replies:
        reason = why_unusable(message, expected, with_arrays)
        if reason is None:
            kept.append(message)
        else:
            ident = (clients.get(message.metadata.reply_to_message_id, message.metadata.src_node_id)
                     if message.has_error() else _safe_partition(message))
            dropped.append((ident, reason))
            log.warning("dropping reply from client %s: %s", ident, reason)
    kept.sort(key=partition_of)
    return kept, dropped


def sent_clients(sent: Iterable[Message]) -> dict[str, int]:
    """Message id -> its client: the partition id the server put in the message's config (simulation assigns
    them), else the destination node id (deployment: only the SuperNode knows its partition)."""
    clients = {}
    for message in sent:
        config = message.content.config_records.get("config") if message.has_content() else None
        partition = config.get(PARTITION_ID) if config is not None else None
        clients[message.metadata.message_id] = int(partition) if partition is not None else message.metadata.dst_node_id
    return clients


def missing_replies(sent: Iterable[Message], replies: Iterable[Message], deadline: float) -> list[tuple[int, str]]:
    """[(client, reason)] of the sent messages without a reply before the round deadline (see sent_clients)."""
    answered = {reply.metadata.reply_to_message_id for reply in replies}
    clients = sent_clients(sent)
    missing = [(client, f"no reply within the round deadline (round_timeout {deadline:g} s)")
               for message_id, client in clients.items() if message_id not in answered]
    for client, reason in missing:
        log.warning("client %s: %s", client, reason)
    return missing


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
    on_gpu = [float(m[FIT_GPU_PEAK_MIB]) for m in metrics if FIT_GPU_PEAK_MIB in m]
    if on_gpu:  # clients that trained on CUDA (none on the CPU: the row is then as before)
        out["fit-gpu-clients"] = len(on_gpu)
        out["fit-gpu-peak-mib-max"] = max(on_gpu)
    return out
