"""Flower ClientApp: local SGD fine-tuning of the global model on one client's partition.

What a message costs is the training itself: the ASR system (Brain, tokenizer, YAML) and the partition file are
built once per worker process and reused while the run's settings stay the same (a one-entry cache keyed by
them), so a cross-device round does not pay start-up costs per client and memory does not grow with the number
of clients. Each message starts from the seed's integer buffers and the received global arrays, never from the
previous client's state.
"""

from __future__ import annotations

import functools
import json
import logging
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedasr.fl.arrays import all_finite, arrayrecord_to_state, encode_update, state_to_arrayrecord
from fedasr.fl.config import import_system_class
from fedasr.fl.faults import inject_fault
from fedasr.fl.privacy import clipping_mod
from fedasr.fl.secure import (
    SECURE_ROUND_KEY, is_secure_sum_request, keep_update, secure_aggregation_mod, weighted_update_reply,
)
from fedasr.fl.strategies.replies import (
    FIT_SECONDS,
    LOCAL_WER,
    LOCAL_WORD_ERRORS,
    LOCAL_WORDS,
    NUM_EXAMPLES,
    PARTITION_ID,
    TRAIN_LOSS,
)

log = logging.getLogger(__name__)


class PartitionLookupError(ValueError):
    """A node whose partition id is not in the partition file; the message names both and the fix."""


@functools.lru_cache(maxsize=1)
def partition_clients(partition: str) -> tuple[dict, ...]:
    """The clients of a partition (index = partition id), each with absolute "train"/"valid" manifests."""
    from fedasr.data.partition import load_partition

    return tuple(load_partition(partition)["clients"])


def client_for(partition: str, partition_id: int) -> dict:
    clients = partition_clients(partition)
    if not 0 <= partition_id < len(clients):
        raise PartitionLookupError(
            f"{partition}: node has partition-id {partition_id} but the partition holds {len(clients)} clients "
            f"(ids 0..{len(clients) - 1}). Start the SuperNode with --node-config \"partition-id=I "
            f"num-partitions={len(clients)}\"."
        )
    return clients[partition_id]


class CachedSystem:
    """An ASR system plus a copy of its seed state (the source of integer buffers for every message)."""

    def __init__(self, system_spec: str, seed_checkpoint: str, overrides_json: str) -> None:
        overrides = json.loads(overrides_json) or None
        self.system = import_system_class(system_spec).from_checkpoint(seed_checkpoint, overrides=overrides)
        self.seed_state = {k: v.detach().clone() for k, v in self.system.state_dict().items()}

    def load_global(self, arrays) -> None:
        self.system.load_state_dict(arrayrecord_to_state(arrays, self.seed_state))


@functools.lru_cache(maxsize=1)
def cached_system(system_spec: str, seed_checkpoint: str, overrides_json: str) -> CachedSystem:
    """One system per worker for a given (system, seed checkpoint, overrides): reused across messages."""
    return CachedSystem(system_spec, seed_checkpoint, overrides_json)


def train_on_partition(arrays, config, partition: str, partition_id: int) -> tuple:
    """Fit the global model on one client's data; returns (ArrayRecord, MetricRecord)."""
    import torch  # here, not with the module: see fedasr/fl/arrays.py

    torch.set_num_threads(int(config.get("threads", 1)))
    client = client_for(partition, partition_id)
    cached = cached_system(str(config["system"]), str(config["seed-checkpoint"]), str(config.get("system-overrides", "{}")))
    cached.load_global(arrays)
    seed = int(config["seed"]) * 100_000 + partition_id
    started = time.perf_counter()
    result = cached.system.fit(client["train"], epochs=int(config["local-epochs"]), lr=float(config["lr"]),
                               batch_size=int(config["batch-size"]), seed=seed,
                               proximal_mu=float(config.get("proximal-mu", 0.0)),
                               optimizer=str(config.get("optimizer", "sgd")), momentum=float(config.get("momentum", 0.0)))
    metrics = {NUM_EXAMPLES: int(result.num_examples), TRAIN_LOSS: float(result.train_loss),
               PARTITION_ID: int(partition_id), FIT_SECONDS: time.perf_counter() - started}
    if bool(config.get("report-wer", False)):
        local = cached.system.evaluate(client["valid"], decoding="greedy")
        metrics.update({LOCAL_WER: float(local.wer), LOCAL_WORD_ERRORS: int(local.word_errors), LOCAL_WORDS: int(local.words)})
    reply = encode_update(state_to_arrayrecord(cached.system.state_dict()), arrays, str(config.get("update-encoding", "fp32")))
    return reply, MetricRecord(metrics)


def node_partition(context: Context, config) -> tuple[str, int]:
    """(partition file, partition id): the one the server assigned in the round's config (simulation), else the
    node's own (deployment: ``--node-config "partition-id=I"``, optionally ``partition=PATH``)."""
    if PARTITION_ID in config:
        return str(config["partition"]), int(config[PARTITION_ID])
    node = context.node_config
    if "partition-id" not in node:
        raise PartitionLookupError(
            "this SuperNode has no partition-id: start it with --node-config \"partition-id=I num-partitions=K\""
        )
    partition = str(node.get("partition") or config["partition"])
    return partition, int(node["partition-id"])


# SecAgg+ messages go through Flower's secaggplus_mod (fedasr/fl/secure.py); updates are clipped when the round asks
# for DP (fedasr/fl/privacy.py); other messages pass both.
app = ClientApp(mods=[secure_aggregation_mod, clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secure_sum_request(msg):  # second step of a secure round: the kept update, weighted, to be masked
        return weighted_update_reply(msg, context)
    config = msg.content["config"]
    partition, partition_id = node_partition(context, config)
    faulty_reply = inject_fault(msg, config, partition_id)  # None unless the fl hparams inject faults
    if faulty_reply is not None:
        return faulty_reply
    arrays, metrics = train_on_partition(msg.content["arrays"], config, partition, partition_id)
    if config.get(SECURE_ROUND_KEY, False):  # the update stays here until SecAgg+ asks for it, masked
        if not all_finite(arrays):
            raise FloatingPointError(f"client {partition_id}: the update holds NaN or infinity (diverged local "
                                     "training); it is not sent")
        keep_update(context, arrays, msg.content["arrays"])
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
