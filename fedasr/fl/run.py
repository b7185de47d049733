"""One federated run's settings: the validated FLConfig and the paths the server and the clients need.

Built by ``fedasr federate`` (fedasr/fl/simulation.py: resolve_run) or, on the Deployment Engine, from Flower's run
config (:func:`run_from_run_config`). Its :meth:`FederatedRun.fingerprint` is what a resume must find unchanged.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord

from fedasr.fl.config import FLConfig, config_from_json
from fedasr.fl.protocol import round_config


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
        """The ConfigRecord sent to clients for one round (fedasr/fl/protocol.py)."""
        return round_config(self.config, server_round=server_round, lr=lr, seed_checkpoint=self.seed_checkpoint,
                            partition=self.partition)

    def fingerprint(self) -> dict:
        """Settings that must be equal for a resume to continue the same experiment."""
        cfg = self.config.to_dict()
        cfg.pop("rounds")  # extending a run with more rounds is allowed
        cfg.pop("round_timeout")
        cfg.pop("min_clients")  # tolerance settings: may be changed to continue a run stopped by failing rounds
        cfg.pop("max_failed_rounds")
        cfg.pop("device")  # where it computes, not what: a run started on the CPU may continue on a GPU
        if cfg.get("precision") == "fp32":
            cfg.pop("precision")  # the default leaves the fingerprint of runs checkpointed before the setting existed
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
