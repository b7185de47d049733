"""What fedasr's ServerApp and ClientApp say to each other: the keys of their messages, a round's config, the seeds.

Both apps import these names; nothing else defines them. A training round is one message per sampled client:

- server -> client: ``RecordDict({"arrays": <global ArrayRecord>, "config": <round config, see round_config>})``;
- client -> server: ``RecordDict({"arrays": <trained ArrayRecord>, "metrics": <MetricRecord, keys below>})``, or, in
  a secure-aggregation round, the metrics alone (the update waits on the client for the SecAgg+ step,
  fedasr/fl/secure.py, whose keys are below too).

Seeds: the server samples a round's clients with :func:`sampling_seed` (server round and run seed only, so a resumed
run samples as an uninterrupted one); it sends :func:`round_seed` in the round's config, and each client seeds its
local training with :func:`client_seed` of it. The formulas are fixed: changing one changes every run's numbers.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord

# ---- a client's training reply (MetricRecord keys) ----------------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # utterances trained on (> 0: a reply without examples is dropped)
TRAIN_LOSS = "train-loss"  # mean training loss of the local epochs
PARTITION_ID = "partition-id"  # the client's partition (also in the round config when the server assigns it)
LOCAL_WER = "wer"  # WER on the client's own validation slice (only when the config asks: REPORT_WER)
LOCAL_WORD_ERRORS = "word-errors"  # its word errors and reference words: the server sums them for train_local_wer
LOCAL_WORDS = "words"
FIT_SECONDS = "fit-seconds"  # wall time of the local training
FIT_GPU_PEAK_MIB = "fit-gpu-peak-mib"  # only from a client on CUDA: peak MiB torch allocated during its training

# ---- a round's config (ConfigRecord keys, server -> client) --------------------------------------------------------
LR = "lr"  # the client learning rate of this round (annealed by the server)
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
OPTIMIZER = "optimizer"  # client optimizer name (sgd, adam, ...)
MOMENTUM = "momentum"
SEED = "seed"  # round_seed(run seed, server round)
SEED_CHECKPOINT = "seed-checkpoint"  # folder of the warm-up model every client starts from
PARTITION = "partition"  # the partition file (a SuperNode may name its own in its node config)
SYSTEM = "system"  # "module:Class" of the ASRSystem
SYSTEM_OVERRIDES = "system-overrides"  # JSON of the system's overrides
THREADS = "threads"  # torch threads of a client
UPDATE_ENCODING = "update-encoding"  # fp32 | fp16 | bf16: how the client sends its weights
DEVICE = "device"  # the run's device request (auto | cpu | cuda | cuda:N); a SuperNode's node config may override it
PRECISION = "precision"  # fp32 | bf16 | fp16: autocast of the local training
SERVER_ROUND = "server-round"
REPORT_WER = "report-wer"  # set by the strategy: the client decodes its validation slice (LOCAL_WER ...)
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
FAULTS = "faults"  # JSON of the injected faults (fedasr/fl/faults.py); absent: none
SECURE_ROUND = "secure-aggregation"  # True: keep the update, reply with metrics only (fedasr/fl/secure.py)

# ---- the SecAgg+ step of a secure round (fedasr/fl/secure.py) ------------------------------------------------------
UPDATE_RECORD = "fedasr.secure-update"  # node state: the update d_k waiting for the SecAgg+ step
WEIGHT = "fedasr-weight"  # in the SecAgg+ step's FitIns config: the client's weight alpha_k
CLIPPING_RANGE = "fedasr-clipping-range"  # in the same config: secure_aggregation.clipping_range
FITINS_CONFIG = "fitins.config"  # the record through which the legacy FitIns config reaches the client
SECAGG_CONFIGS = "secaggplus_configs"  # the record SecAgg+ messages carry (flwr secaggplus_constants)


def sampling_seed(seed: int, server_round: int) -> int:
    """Seed of the client sampling of one round: independent of earlier rounds, so a resumed run samples alike."""
    return int(seed) * 100_003 + int(server_round)


def round_seed(seed: int, server_round: int) -> int:
    """The seed a round's config carries (key SEED)."""
    return int(seed) * 1000 + int(server_round)


def client_seed(seed_of_round: int, partition_id: int) -> int:
    """Seed of one client's local training, from the round's SEED and the client's partition id."""
    return int(seed_of_round) * 100_000 + int(partition_id)


def server_training_seed(seed: int, server_round: int) -> int:
    """Seed of the server's own fine-tuning in one round (server_training): the server trains as partition -1."""
    return client_seed(round_seed(seed, server_round), -1)


def round_config(config, *, server_round: int, lr: float, seed_checkpoint: str, partition: str) -> ConfigRecord:
    """The ConfigRecord sent to every client of one round (``config``: the run's FLConfig)."""
    return ConfigRecord({
        LR: float(lr),
        LOCAL_EPOCHS: int(config.local_epochs),
        BATCH_SIZE: int(config.batch_size),
        OPTIMIZER: config.client_optimizer.name,
        MOMENTUM: float(config.client_optimizer.momentum),
        SEED: round_seed(config.seed, server_round),
        SEED_CHECKPOINT: seed_checkpoint,
        PARTITION: partition,
        SYSTEM: config.system,
        SYSTEM_OVERRIDES: json.dumps(config.system_overrides, sort_keys=True),
        THREADS: int(config.client_threads),
        UPDATE_ENCODING: config.update_encoding,
        DEVICE: str(config.device),
        PRECISION: str(config.precision),
        SERVER_ROUND: int(server_round),
        **({FAULTS: config.faults.to_json(config.seed)} if config.faults.enabled else {}),
        **({SECURE_ROUND: True} if config.secure_aggregation.enabled else {}),
    })
