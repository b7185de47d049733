"""Fault injection for simulations: clients that drop out, crash, diverge (NaN) or straggle, reproducibly.

Why: federated training must survive unreliable clients (the reference's "Networking and Wireless, Compute
Heterogeneity" questions), and the server's handling of them is only trustworthy if it is exercised. The faults are
decided inside the ClientApp, at the start of ``train``, from the ``faults`` section of hparams/fl/*.yaml (sent in
each round's config), so the server sees exactly what it would see from real devices:

- ``dropout``: the client answers with the error a SuperLink returns for a node that stopped heart-beating
  (``ErrorCode.NODE_UNAVAILABLE``), at once, so a simulated dropout does not hold the round until its deadline;
- ``crash``: the ClientApp raises; Flower turns it into a ``CLIENT_APP_RAISED_EXCEPTION`` error reply;
- ``nan``: the client answers with NaN arrays (a diverged local training) and a normal metrics record;
- ``slow``: a straggler sleeps ``slow_seconds`` before training; past ``round_timeout`` (the round deadline) its
  reply arrives too late and the server counts it as missing.

Each draw depends only on (seed, round, partition id), never on arrival order or on other clients, so a run is
reproducible and a resumed run injects the same faults. ``dropout``, ``crash`` and ``nan`` are exclusive
probabilities per sampled client and round; ``slow`` is a fixed property of a client (drawn from (seed, partition
id) only: a slow device stays slow, the "slow tail" of compute heterogeneity). ``inject`` names faults for given
clients in every round (tests, demonstrations); ``first_round`` lets the first rounds run without faults.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedasr.fl.protocol import FAULTS, NUM_EXAMPLES, PARTITION_ID, SERVER_ROUND, TRAIN_LOSS

log = logging.getLogger(__name__)

FAULT_KINDS = ("dropout", "crash", "nan", "slow")


class InjectedCrash(RuntimeError):
    """Raised by a client told to crash: the server must see an error reply, as from a real failing client."""


@dataclass
class Faults:
    """The ``faults:`` section of hparams/fl/*.yaml (all off by default)."""

    dropout: float = 0.0  # probability that a sampled client drops out this round
    crash: float = 0.0  # probability that a sampled client's ClientApp raises this round
    nan: float = 0.0  # probability that a sampled client returns NaN arrays this round
    slow: float = 0.0  # fraction of clients that are stragglers (fixed per client)
    slow_seconds: float = 0.0  # delay of a straggler before it trains, every round it is sampled
    inject: dict = field(default_factory=dict)  # {partition id: dropout | crash | nan | slow}, every round
    first_round: int = 1  # rounds before it run without faults (a study's warm rounds; Ray's start-up)

    @property
    def enabled(self) -> bool:
        return bool(self.dropout or self.crash or self.nan or self.slow or self.inject)

    def to_json(self, seed: int) -> str:
        """The settings plus the run's seed, as sent in each round's config (the round's own seed varies)."""
        return json.dumps({**asdict(self), "seed": int(seed)}, sort_keys=True)


def check_faults(faults: Faults) -> str | None:
    """None when the settings are valid, else what is wrong and how to fix it."""
    for name in ("dropout", "crash", "nan", "slow"):
        value = float(getattr(faults, name))
        if not 0.0 <= value <= 1.0:
            return f"faults.{name} is a probability and must lie in [0, 1], got {value}"
    if faults.dropout + faults.crash + faults.nan > 1.0:
        return (f"faults.dropout + faults.crash + faults.nan must be <= 1 (one fault per client and round), got "
                f"{faults.dropout + faults.crash + faults.nan:g}")
    if int(faults.first_round) < 1:
        return f"faults.first_round must be >= 1, got {faults.first_round}"
    if faults.slow_seconds < 0:
        return f"faults.slow_seconds must be >= 0, got {faults.slow_seconds}"
    if faults.slow and not faults.slow_seconds:
        return "faults.slow is set but faults.slow_seconds is 0: give stragglers a delay in seconds"
    if not isinstance(faults.inject, dict):
        return f"faults.inject must map partition ids to faults, e.g. {{3: crash}}, got {faults.inject!r}"
    for client, kind in faults.inject.items():
        if not str(client).isdigit():
            return f"faults.inject: key {client!r} is not a partition id (an integer >= 0)"
        if kind not in FAULT_KINDS:
            return f"faults.inject: client {client} has fault {kind!r}; choose one of {FAULT_KINDS}"
        if kind == "slow" and not faults.slow_seconds:
            return f"faults.inject: client {client} is slow but faults.slow_seconds is 0: give it a delay"
    return None


def faults_from_dict(raw: dict | None) -> Faults:
    raw = dict(raw or {})
    inject = {int(k) if str(k).isdigit() else k: v for k, v in (raw.pop("inject", None) or {}).items()}
    return Faults(**raw, inject=inject)


def draw_faults(faults: Faults, seed: int, server_round: int, partition_id: int) -> list[str]:
    """The faults of one client in one round: [] (healthy), "slow" and/or one of dropout, crash, nan.

    A client named in ``faults.inject`` gets exactly its named fault (the random draws are skipped for it).
    """
    if server_round < faults.first_round:
        return []
    if partition_id in faults.inject:
        return [faults.inject[partition_id]]
    drawn = []
    if faults.slow and np.random.default_rng([seed, partition_id, 0]).random() < faults.slow:
        drawn.append("slow")
    chance = np.random.default_rng([seed, server_round, partition_id, 1]).random()
    for kind in ("dropout", "crash", "nan"):
        probability = getattr(faults, kind)
        if chance < probability:
            drawn.append(kind)
            break
        chance -= probability
    return drawn


def inject_fault(msg: Message, config, partition_id: int) -> Message | None:
    """Called at the start of the ClientApp's train: sleeps, raises, or returns the faulty reply; None: train."""
    if FAULTS not in config:
        return None
    settings = json.loads(str(config[FAULTS]))
    seed = int(settings.pop("seed"))
    server_round = int(config[SERVER_ROUND])
    faults = faults_from_dict(settings)
    drawn = draw_faults(faults, seed, server_round, partition_id)
    if not drawn:
        return None
    log.warning("fault injection: client %d, round %d: %s", partition_id, server_round, "+".join(drawn))
    if "slow" in drawn:
        time.sleep(faults.slow_seconds)
    if "dropout" in drawn:
        return Message(Error(code=ErrorCode.NODE_UNAVAILABLE,
                             reason=f"client {partition_id} dropped out in round {server_round} (fault injection)"),
                       reply_to=msg)
    if "crash" in drawn:
        raise InjectedCrash(f"client {partition_id} crashed in round {server_round} (fault injection)")
    if "nan" in drawn:
        return nan_reply(msg, partition_id)
    return None


def nan_reply(msg: Message, partition_id: int) -> Message:
    """What a diverged client sends: the arrays it received, all NaN, with believable metrics."""
    from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord

    received = arrays_to_numpy(msg.content["arrays"])
    arrays = numpy_to_arrayrecord({k: np.full_like(v, np.nan) for k, v in received.items()})
    metrics = MetricRecord({NUM_EXAMPLES: 1, TRAIN_LOSS: 1.0, PARTITION_ID: int(partition_id)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
