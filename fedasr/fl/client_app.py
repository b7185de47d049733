"""Flower ClientApp: local SGD fine-tuning of the global model on one client's partition.

What a message costs is the training itself: the ASR system (Brain, tokenizer, YAML) and the partition file are
built once per worker process and reused while the run's settings stay the same (a one-entry cache keyed by
them), so a cross-device round does not pay start-up costs per client and memory does not grow with the number
of clients. Each message starts from the seed's integer buffers and the received global arrays, never from the
previous client's state.

Device: a SuperNode's node config ``device`` (Deployment Engine: ``--node-config "device=cuda:1"``), else the run's
``device`` from the round config, where ``cuda:N`` means the GPU Ray assigned this worker (Ray sets
CUDA_VISIBLE_DEVICES to it, so it is cuda:0 here) and ``auto`` a GPU when one is visible. A request the node
cannot meet fails the message with the device named. After each fit the system releases the client's optimizer
state and gradients (fedasr/models/system.py), so GPU memory does not grow with the clients a worker trains.
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
from fedasr.fl.protocol import (
    BATCH_SIZE, DEVICE, FIT_GPU_PEAK_MIB, FIT_SECONDS, LOCAL_EPOCHS, LOCAL_WER, LOCAL_WORD_ERRORS, LOCAL_WORDS, LR, MOMENTUM,
    NUM_EXAMPLES, OPTIMIZER, PARTITION, PARTITION_ID, PRECISION, PROXIMAL_MU, REPORT_WER, SECURE_ROUND, SEED,
    SEED_CHECKPOINT, SYSTEM, SYSTEM_OVERRIDES, THREADS, TRAIN_LOSS, UPDATE_ENCODING, client_seed,
)
from fedasr.fl.secure import is_secure_sum_request, keep_update, secure_aggregation_mod, weighted_update_reply
from fedasr.utils.device import peak_gpu_memory, resolve_device

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

    def __init__(self, system_spec: str, seed_checkpoint: str, overrides_json: str, device: str = "cpu",
                 precision: str = "fp32") -> None:
        overrides = json.loads(overrides_json) or None
        extra = {"precision": precision} if precision != "fp32" else {}  # systems without it keep working at fp32
        self.system = import_system_class(system_spec).from_checkpoint(seed_checkpoint, overrides=overrides,
                                                                       device=device, **extra)
        self.seed_state = {k: v.detach().clone() for k, v in self.system.state_dict().items()}

    def load_global(self, arrays) -> None:
        self.system.load_state_dict(arrayrecord_to_state(arrays, self.seed_state))


@functools.lru_cache(maxsize=1)
def cached_system(system_spec: str, seed_checkpoint: str, overrides_json: str, device: str = "cpu",
                  precision: str = "fp32") -> CachedSystem:
    """One system per worker for a given (system, seed checkpoint, overrides, device, precision): reused across
    messages; a new key drops the previous system (and frees its memory) first."""
    if cached_system.cache_info().currsize:
        cached_system.cache_clear()
    return CachedSystem(system_spec, seed_checkpoint, overrides_json, device, precision)


def client_device(node_config, config) -> str:
    """The resolved device of this client: the node config's ``device`` (Deployment), else the run's request with
    any GPU index dropped (the GPU a simulated client gets is the one Ray made visible: cuda:0 here)."""
    if node_config.get("device"):
        return resolve_device(str(node_config["device"]), what="SuperNode device (node config)")
    request = str(config.get(DEVICE, "auto"))
    if request.strip().lower().startswith("cuda"):
        request = "cuda"
    return resolve_device(request, what="client device (the run's device, on the GPU Ray assigned)")


def train_on_partition(arrays, config, partition: str, partition_id: int, node_config=None) -> tuple:
    """Fit the global model on one client's data; returns (ArrayRecord, MetricRecord)."""
    import torch  # here, not with the module: see fedasr/fl/arrays.py

    torch.set_num_threads(int(config.get(THREADS, 1)))
    client = client_for(partition, partition_id)
    device = client_device(node_config or {}, config)
    cached = cached_system(str(config[SYSTEM]), str(config[SEED_CHECKPOINT]), str(config.get(SYSTEM_OVERRIDES, "{}")),
                           device, str(config.get(PRECISION, "fp32")))
    cached.load_global(arrays)
    peak_gpu_memory(device, reset=True)  # None on the CPU
    started = time.perf_counter()
    try:
        result = cached.system.fit(
            client["train"], epochs=int(config[LOCAL_EPOCHS]), lr=float(config[LR]), batch_size=int(config[BATCH_SIZE]),
            seed=client_seed(int(config[SEED]), partition_id), proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
            optimizer=str(config.get(OPTIMIZER, "sgd")), momentum=float(config.get(MOMENTUM, 0.0)))
    except torch.cuda.OutOfMemoryError as err:  # the reply's error reason, in metrics.jsonl's `failed`
        raise RuntimeError(
            f"client {partition_id}: out of GPU memory on {device} (batch_size {config[BATCH_SIZE]}, precision "
            f"{config.get(PRECISION, 'fp32')}): clients sharing a GPU each hold the model, its gradients, optimizer "
            "state and activations. Give each client more of a GPU (client_num_gpus 0.5 or 1), or lower batch_size, "
            f"or train at precision bf16. torch: {str(err).splitlines()[0]}") from None
    metrics = {NUM_EXAMPLES: int(result.num_examples), TRAIN_LOSS: float(result.train_loss),
               PARTITION_ID: int(partition_id), FIT_SECONDS: time.perf_counter() - started}
    peak = peak_gpu_memory(device)
    if peak is not None:  # on CUDA only (CPU replies, and so the metrics rows, are as before)
        metrics[FIT_GPU_PEAK_MIB] = peak / 2**20
    if bool(config.get(REPORT_WER, False)):
        local = cached.system.evaluate(client["valid"], decoding="greedy")
        metrics.update({LOCAL_WER: float(local.wer), LOCAL_WORD_ERRORS: int(local.word_errors), LOCAL_WORDS: int(local.words)})
    reply = encode_update(state_to_arrayrecord(cached.system.state_dict()), arrays, str(config.get(UPDATE_ENCODING, "fp32")))
    return reply, MetricRecord(metrics)


def node_partition(context: Context, config) -> tuple[str, int]:
    """(partition file, partition id): the one the server assigned in the round's config (simulation), else the
    node's own (deployment: ``--node-config "partition-id=I"``, optionally ``partition=PATH``)."""
    if PARTITION_ID in config:
        return str(config[PARTITION]), int(config[PARTITION_ID])
    node = context.node_config
    if "partition-id" not in node:
        raise PartitionLookupError(
            "this SuperNode has no partition-id: start it with --node-config \"partition-id=I num-partitions=K\""
        )
    partition = str(node.get("partition") or config[PARTITION])
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
    arrays, metrics = train_on_partition(msg.content["arrays"], config, partition, partition_id, context.node_config)
    if config.get(SECURE_ROUND, False):  # the update stays here until SecAgg+ asks for it, masked
        if not all_finite(arrays):
            raise FloatingPointError(f"client {partition_id}: the update holds NaN or infinity (diverged local "
                                     "training); it is not sent")
        keep_update(context, arrays, msg.content["arrays"])
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
