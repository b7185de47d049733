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
from fedasr.fl.sampling import NODE_WAIT_SECONDS


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
    node_wait: float = NODE_WAIT_SECONDS  # deployment: seconds the first round waits for its SuperNodes
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
        cfg["evaluation"].pop("test_seed", None)  # whether round 0 is tested: reporting, not the experiment
        if not cfg["evaluation"].get("ema_decay"):
            cfg["evaluation"].pop("ema_decay", None)  # off: as for precision
        if cfg.get("strategy", {}).get("server_optimizer") == "sgd":
            cfg["strategy"].pop("server_optimizer")  # the default: as for precision
        if not cfg.get("server_training", {}).get("epochs"):
            cfg.pop("server_training", None)  # off: as for precision (and the manifest is then never read)
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


DEMO_HINT = ("the defaults of [tool.flwr.app.config] in pyproject.toml point at the outputs of `make demo` "
             "(results/demo): run it first, or pass your own paths, e.g. flwr run . --run-config "
             "\"partition='OUT/partitions/cross-silo' seed-checkpoint='OUT/runs/.../seed_checkpoint'\"")


def run_from_run_config(run_config: dict, *, simulation: bool = False) -> FederatedRun:
    """Build the run from Flower's run config ([tool.flwr.app.config] + --run-config), checked as ``fedasr
    federate`` checks its arguments.

    Keys: ``hparams`` (an fl hparams file), ``partition``, ``seed-checkpoint``, ``output-dir``; ``dev-manifest`` and
    ``test-manifest`` ("": dev.csv / test.csv beside the partition's source manifest, as in ``fedasr federate``);
    ``num-server-rounds`` (> 0: the number of rounds, over the hparams' ``rounds``); ``overrides`` (hparams
    overrides: ``KEY=VALUE`` pairs as ``fedasr federate --set`` takes them, or a JSON object of nested keys); ``mode``; ``num-clients`` (0: every client of the partition); ``resume``;
    ``stop-after-round``; ``node-wait`` (deployment: seconds the first round waits for its SuperNodes).
    Relative paths resolve against the app folder (see :func:`app_base`). ``simulation``: the Grid is Flower's
    Simulation Engine, so the server assigns the partitions to the SuperNodes there are.
    """
    from fedasr.fl.config import FLConfigError, load_fl_config, server_training_manifest

    rounds = int(run_config.get("num-server-rounds") or 0)
    if rounds < 0:
        raise FLConfigError(f"num-server-rounds must be >= 0 (0: the hparams' rounds), got {rounds}")
    missing = [k for k in ("partition", "seed-checkpoint", "output-dir") if not str(run_config.get(k) or "")]
    if not run_config.get("resolved-config") and not str(run_config.get("hparams") or ""):
        missing.insert(0, "hparams")
    if missing:
        raise FLConfigError(f"run config lacks {missing}: {DEMO_HINT} (README: As a Flower app)")
    base = app_base(str(run_config["partition"]), str(run_config["seed-checkpoint"]))

    def path(key: str) -> str:  # an input found under one of the app folders, else under ``base``
        value = str(run_config.get(key) or "")
        if not value:
            return ""
        if key != "output-dir" and not Path(value).expanduser().is_absolute():
            for folder in _app_folders():
                if (folder / value).exists():
                    return str(_resolve(value, folder))
        return str(_resolve(value, base))

    if run_config.get("resolved-config"):
        config = config_from_json(str(run_config["resolved-config"]))
        if rounds:
            config = _with_rounds(config, rounds)
    else:
        overrides = run_config_overrides(run_config.get("overrides"))
        if run_config.get("mode"):
            overrides["mode"] = str(run_config["mode"])
        if rounds and "rounds" in overrides and int(overrides["rounds"]) != rounds:
            raise FLConfigError(
                f"run config: num-server-rounds is {rounds} but overrides set rounds={overrides['rounds']}: give the "
                "rounds once, as Flower's num-server-rounds (e.g. --run-config \"num-server-rounds="
                f"{overrides['rounds']}\"), or set num-server-rounds = 0 to use the overrides' rounds")
        if rounds:
            overrides["rounds"] = rounds
        config = load_fl_config(path("hparams"), overrides)
    partition, seed = path("partition"), path("seed-checkpoint")
    for key, value in (("partition", partition), ("seed-checkpoint", seed)):
        if not Path(value).exists():
            raise FileNotFoundError(f"{value}: {key} not found (relative paths resolve against {base}); {DEMO_HINT}")
    from fedasr.data.partition import load_partition

    partition = load_partition(partition)["path"]  # as `fedasr federate` names it (a resume compares the names)
    dev, test = path("dev-manifest"), path("test-manifest")
    if not dev or not test:
        from fedasr.fl.simulation import default_eval_manifests

        default_dev, default_test = default_eval_manifests(partition)
        dev, test = dev or default_dev, test or default_test
    if not Path(dev).exists():
        raise FileNotFoundError(f"{dev}: dev manifest not found (the server evaluates the global model on it): "
                                "set dev-manifest in the run config")
    if test and not Path(test).exists():
        raise FileNotFoundError(f"{test}: test manifest not found: set test-manifest in the run config, or leave it "
                                "empty")
    if config.server_training.epochs:  # a relative manifest resolves as the other inputs
        config.server_training.manifest = server_training_manifest(config, base)
    num_clients = int(run_config.get("num-clients") or 0) or _count_clients(partition)
    if config.clients_per_round is not None and int(config.clients_per_round) > num_clients:
        raise FLConfigError(f"clients_per_round is {config.clients_per_round} but the run has {num_clients} clients "
                            f"({partition}): lower it in the overrides, or raise num-clients")
    return FederatedRun(
        config=config, seed_checkpoint=seed, partition=partition, output_dir=path("output-dir"), dev_manifest=dev,
        test_manifest=test, num_clients=num_clients, resume=bool(run_config.get("resume", False)),
        stop_after_round=int(run_config.get("stop-after-round") or 0), assign_partitions=simulation,
        node_wait=float(run_config.get("node-wait", NODE_WAIT_SECONDS)),
    )


def _with_rounds(config: FLConfig, rounds: int) -> FLConfig:
    from fedasr.fl.config import config_from_dict

    return config_from_dict({**config.to_dict(), "rounds": rounds}, source="resolved-config + num-server-rounds")


def app_base(*anchors: str) -> Path:
    """The folder relative paths of the run config resolve against: the app folder.

    ``flwr run .`` runs the ServerApp from an installed copy of the app (in $FLWR_HOME/apps) inside the SuperLink's
    working directory, so the app folder is found as: the working directory when a relative ``anchor`` (the
    partition, then the seed checkpoint) exists under it, else the fedasr checkout the package was installed from
    (``pip install -e .``, as scripts/setup.sh does) when it holds one, else the working directory."""
    for anchor in anchors:
        if anchor and not Path(anchor).expanduser().is_absolute():
            for base in (f for f in (Path.cwd(), _editable_checkout()) if f is not None):
                if (base / anchor).exists():
                    return base
    return Path.cwd()


def _app_folders() -> list[Path]:
    """Where relative inputs are looked for, in order: the working directory, the editable fedasr checkout, and
    the app copy this code runs from (``flwr run`` installs one in $FLWR_HOME/apps: it holds hparams/)."""
    folders = [Path.cwd(), _editable_checkout(), Path(__file__).resolve().parents[2]]
    unique = []
    for folder in folders:
        if folder is not None and folder not in unique:
            unique.append(folder)
    return unique


def _resolve(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


@functools.lru_cache(maxsize=1)
def _editable_checkout() -> Path | None:
    """The source folder of an editable install of fedasr (PEP 610 direct_url.json), or None."""
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    for dist in metadata.distributions(name="fedasr"):  # a checkout's own fedasr.egg-info has no direct_url.json
        try:
            info = json.loads(dist.read_text("direct_url.json") or "{}")
        except (OSError, ValueError):
            continue
        if info.get("dir_info", {}).get("editable") and str(info.get("url", "")).startswith("file:"):
            folder = Path(unquote(urlparse(info["url"]).path))
            if (folder / "pyproject.toml").is_file():
                return folder
    return None


def _count_clients(partition: str) -> int:
    from fedasr.fl.client_app import partition_clients

    return len(partition_clients(partition))


def run_config_overrides(text) -> dict:
    """The run config's ``overrides``: space-separated ``KEY=VALUE`` pairs, dotted where the hparams nest (the
    rule of every ``--set``: ``"lr=0.002 evaluation.test_decoding=greedy"``), or a JSON object (``{...}``)."""
    from fedasr.utils.settings import parse_dotted_overrides

    text = str(text or "").strip()
    if not text.startswith("{"):
        return parse_dotted_overrides(text.split(), example="overrides = 'lr=0.002 strategy.temperature=0.5'")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"run config `overrides`: not a JSON object ({err}); or give KEY=VALUE pairs, e.g. "
                         "overrides = 'lr=0.002 strategy.temperature=0.5'") from None
    if not isinstance(value, dict):
        raise ValueError(f"run config `overrides` must be a JSON object or KEY=VALUE pairs, got {text!r}")
    return value
