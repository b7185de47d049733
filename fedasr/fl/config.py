"""Settings of a federated run: hparams/fl/*.yaml + command-line overrides, validated once.

The YAML holds the experiment (rounds, local epochs, lr, strategy, annealing, evaluation, resources); the paths
(partition, seed checkpoint, output, dev/test manifests) come from the command line or Flower's run config.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hyperpyyaml import load_hyperpyyaml

from fedasr.fl.faults import Faults, check_faults, faults_from_dict
from fedasr.utils.device import PRECISIONS, DeviceError, check_device
from fedasr.utils.settings import deep_merge, did_you_mean, parse_dotted_overrides, quiet_logger

MODES = ("cross-silo", "cross-device")
WER_SOURCES = ("server", "client")
UPDATE_ENCODINGS = ("fp32", "fp16", "bf16")
CLIENT_OPTIMIZERS = ("sgd", "adam")
DEFAULT_SYSTEM = "fedasr.models.system:SpeechBrainASRSystem"


class FLConfigError(ValueError):
    """An invalid federated setting; the message names the file, the key and the fix."""


@dataclass
class Annealing:
    enabled: bool = True
    factor: float = 0.8
    threshold: float = 0.0025
    patience: int = 0


@dataclass
class ClientOptimizer:
    """The optimizer of each client's local training, built fresh (empty state) for every round."""

    name: str = "adam"  # adam | sgd (hparams/fl/cross_silo.yaml says why adam)
    momentum: float = 0.0  # sgd only; 0 = plain SGD (the published client, hparams/fl/paper.yaml)


@dataclass
class Evaluation:
    decoding: str = "greedy"  # decoding of the per-round dev evaluation
    dev_max_utterances: int | None = None  # None: the whole dev set every round
    test_every: int = 0  # 0: test WER at the end only
    test_seed: bool = True  # test WER of the seed too (round 0); a pipeline has it from its warm-up stage already
    ema_decay: float = 0.0  # > 0: evaluate and hand back an EMA of the global models (fedasr/fl/model_average.py)
    test_decoding: str = "beam"
    server_wer_utterances: int = 100  # size of the fixed server-held subset scoring each client (wer_source=server)


@dataclass
class Privacy:
    """Client-level differential privacy (fedasr/fl/privacy.py): off by default; supported with fedavg only."""

    enabled: bool = False
    noise_multiplier: float = 1.0  # z: noise std = z * clipping_norm / clients_per_round on the average update
    clipping_norm: float = 1.0  # C: L2 bound of one client's update (x_k - x), enforced on the client
    per_layer: bool = False  # clip each array to C / sqrt(number of arrays) instead of the whole update to C
    delta: float = 1e-5  # epsilon is reported at this delta; must be < 1 / number of clients
    accounting: str = "sampled"  # sampled (amplification by the m-of-N sampling done) | no-amplification
    secure_noise: bool = False  # False: noise seeded by `seed` (reproducible research runs); True: OS entropy
    frozen_keys: list = field(default_factory=lambda: ["*.glob_mean", "*.glob_std"])  # never taken from clients


@dataclass
class SecureAggregation:
    """SecAgg+ (fedasr/fl/secure.py): the server learns the weighted sum of the clients' updates, no single one."""

    enabled: bool = False
    num_shares: int | float = 1.0  # int > 2: key shares per client; float in (0, 1]: that share of the round's clients
    reconstruction_threshold: int | float = 0.5  # shares needed to unmask a dropout: int, or float share of num_shares
    clipping_range: float = 8.0  # every value alpha_k * (x_k - x) a client sends must lie in [-range, range]
    quantization_range: int = 4194304  # 2**22 integer levels over [-clipping_range, clipping_range]
    modulus_range: int = 4294967296  # 2**32: masks and sums are taken modulo this power of 2


@dataclass
class ServerTraining:
    """Fine-tuning of each round's aggregated model on data the server holds (the reference code's
    TrainAfterAggregateStrategy), with the clients' optimizer; off (epochs 0) in the published method."""

    epochs: int = 0  # 0: off; N: N epochs on ``manifest`` after every aggregation
    manifest: str | None = None  # the server-held train.csv (the pipeline: its warm-up speakers')
    lr: float | None = None  # None: the round's client lr (annealed with it)
    batch_size: int | None = None  # None: the clients' batch_size


@dataclass
class FLConfig:
    mode: str = "cross-silo"
    rounds: int = 20
    local_epochs: int = 5
    lr: float = 0.001
    batch_size: int = 8
    seed: int = 1234
    clients_per_round: int | None = None  # None: all clients (cross-silo)
    client_optimizer: ClientOptimizer = field(default_factory=ClientOptimizer)
    strategy: dict = field(default_factory=lambda: {"name": "wer-softmax", "temperature": 1.0, "mix": 1.0,
                                                            "server_optimizer": "sgd", "server_lr": 1.0})
    wer_source: str = "server"
    annealing: Annealing = field(default_factory=Annealing)
    evaluation: Evaluation = field(default_factory=Evaluation)
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0  # GPU share per simulated client (0.5: two clients per GPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N: server and clients (fedasr/utils/device.py; clients: Ray's GPU)
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of local training and decoding (fp16: CUDA only)
    client_threads: int = 1
    ray_address: str | None = None  # None: a new Ray on this machine (or $RAY_ADDRESS); "HOST:PORT": that cluster
    update_encoding: str = "fp32"  # fp32 | fp16 | bf16: precision of the update a client sends back
    round_timeout: float = 3600.0  # the round deadline: replies later than this are counted as missing
    min_clients: int = 1  # fewer usable replies: the round keeps the previous global model (round_skipped)
    max_failed_rounds: int = 3  # this many skipped rounds in a row stop the run (checkpointed) with an error
    faults: Faults = field(default_factory=Faults)  # fault injection for studies and tests (off by default)
    privacy: Privacy = field(default_factory=Privacy)  # client-level differential privacy (off by default)
    secure_aggregation: SecureAggregation = field(default_factory=SecureAggregation)  # SecAgg+ (off by default)
    server_training: ServerTraining = field(default_factory=ServerTraining)  # server-side fine-tuning (off by default)
    system: str = DEFAULT_SYSTEM  # "module:Class" implementing fedasr.models.api.ASRSystem
    system_overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_overrides(pairs: list[str] | None) -> dict:
    """``["strategy.temperature=0.05", "rounds=3"]`` -> nested dict; values parsed as YAML scalars."""
    try:
        return parse_dotted_overrides(pairs, example="--set rounds=3 --set strategy.temperature=0.05")
    except ValueError as err:
        raise FLConfigError(str(err)) from None


def load_fl_config(hparams: str | Path, overrides: dict | None = None) -> FLConfig:
    """Read hparams/fl/*.yaml, apply ``overrides`` (nested dict), check every key and value."""
    path = Path(hparams)
    raw = overlay(_read_settings_file(path), overrides or {})
    return config_from_dict(raw, source=str(path))


def overlay(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in; naming another strategy drops the base's settings of the old one."""
    new_strategy = (extra.get("strategy") or {}).get("name")
    if new_strategy and new_strategy != (base.get("strategy") or {}).get("name"):
        base = {**base, "strategy": {}}
    return deep_merge(base, extra)


def _read_settings_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """One hparams/fl file; ``extends: other.yaml`` (relative to it) overlays it on another file."""
    if not path.exists():
        source = f" (extended by {chain[-1]})" if chain else ""
        raise FLConfigError(f"{path}: federated hparams file not found{source}. Use one of hparams/fl/*.yaml.")
    if path.resolve() in chain:
        raise FLConfigError(f"{path}: 'extends' forms a cycle through {[str(p) for p in chain]}.")
    with open(path, encoding="utf-8") as handle:
        raw = load_hyperpyyaml(handle) or {}
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    return overlay(_read_settings_file(path.parent / str(parent), chain + (path.resolve(),)), raw)


def config_from_dict(raw: dict, source: str = "<config>") -> FLConfig:
    known = set(FLConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise FLConfigError(f"{source}: unknown key(s) {unknown}{did_you_mean(unknown, known)}; valid keys are "
                            f"{sorted(known)}")
    values = dict(raw)
    for name, section in (("client_optimizer", ClientOptimizer), ("annealing", Annealing), ("evaluation", Evaluation),
                          ("privacy", Privacy), ("secure_aggregation", SecureAggregation),
                          ("server_training", ServerTraining)):
        given = values.get(name) or {}
        valid = set(section.__dataclass_fields__)
        wrong = sorted(set(given) - valid) if isinstance(given, dict) else []
        if wrong:
            raise FLConfigError(f"{source}: unknown key(s) {[f'{name}.{k}' for k in wrong]}{did_you_mean(wrong, valid)}; "
                                f"valid keys of {name} are {sorted(valid)}")
    try:
        values["client_optimizer"] = _typed(ClientOptimizer(**(values.get("client_optimizer") or {})))
        values["annealing"] = _typed(Annealing(**(values.get("annealing") or {})))
        values["evaluation"] = _typed(Evaluation(**(values.get("evaluation") or {})))
        values["faults"] = _typed(faults_from_dict(values.get("faults")))
        values["privacy"] = _typed(Privacy(**(values.get("privacy") or {})))
        values["secure_aggregation"] = _typed(SecureAggregation(**(values.get("secure_aggregation") or {})))
        values["server_training"] = _typed(ServerTraining(**(values.get("server_training") or {})))
        config = _typed(FLConfig(**values))
    except (TypeError, ValueError) as err:
        raise FLConfigError(f"{source}: {err}. See the keys documented in hparams/fl/cross_silo.yaml.") from None
    validate(config, source)
    return config


_NUMBER_TYPES = {"float": float, "int": int, "int | None": int, "float | None": float}


def _typed(settings):
    """Numbers given as text (YAML reads ``1e-3`` as a string) become the declared int/float; bad text raises."""
    for name, spec in settings.__dataclass_fields__.items():
        cast = _NUMBER_TYPES.get(str(spec.type))
        value = getattr(settings, name)
        if cast is not None and value is not None and not isinstance(value, bool):
            try:
                setattr(settings, name, cast(float(value)) if cast is int and float(value).is_integer() else cast(value))
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {value!r}") from None
    return settings


def validate(config: FLConfig, source: str = "<config>") -> None:
    def fail(message: str) -> None:
        raise FLConfigError(f"{source}: {message}")

    if config.mode not in MODES:
        fail(f"mode must be one of {MODES}, got {config.mode!r}")
    if config.wer_source not in WER_SOURCES:
        fail(f"wer_source must be one of {WER_SOURCES}, got {config.wer_source!r}")
    for key in ("rounds", "local_epochs", "batch_size", "client_threads"):
        if int(getattr(config, key)) < 1:
            fail(f"{key} must be >= 1, got {getattr(config, key)}")
    if not 0.0 <= config.evaluation.ema_decay < 1.0:
        fail(f"evaluation.ema_decay must lie in [0, 1) (0: the global model itself), got {config.evaluation.ema_decay}")
    if config.lr <= 0:
        fail(f"lr must be > 0, got {config.lr}")
    opt = config.client_optimizer
    if opt.name not in CLIENT_OPTIMIZERS:
        fail(f"client_optimizer.name must be one of {CLIENT_OPTIMIZERS}, got {opt.name!r}")
    if not 0.0 <= opt.momentum < 1.0 or (opt.momentum and opt.name != "sgd"):
        fail(f"client_optimizer.momentum must lie in [0, 1) and applies to sgd only, got {opt.momentum} with {opt.name}")
    if config.clients_per_round is not None and int(config.clients_per_round) < 1:
        fail(f"clients_per_round must be >= 1 or null (all clients), got {config.clients_per_round}")
    if not isinstance(config.strategy, dict) or "name" not in config.strategy:
        fail("strategy must be a mapping with a name, e.g. {name: wer-softmax, temperature: 0.01}")
    from fedasr.fl.strategies.factory import build_strategy  # here: the strategies import Flower

    try:  # a trial build: every strategy setting's value is checked here, not after Ray has started
        per_round = int(config.clients_per_round or 1)
        with quiet_logger("flwr"):
            build_strategy(*strategy_name_and_settings(config), num_clients=per_round, clients_per_round=per_round)
    except ValueError as err:
        fail(str(err))
    if int(config.min_clients) < 1 or int(config.max_failed_rounds) < 1:
        fail(f"min_clients and max_failed_rounds must be >= 1, got {config.min_clients} and {config.max_failed_rounds}")
    if config.round_timeout <= 0:
        fail(f"round_timeout must be > 0 seconds, got {config.round_timeout}")
    fault_problem = check_faults(config.faults)
    if fault_problem:
        fail(fault_problem)
    privacy_problem = check_privacy(config)
    if privacy_problem:
        fail(privacy_problem)
    secure_problem = check_secure_aggregation(config)
    if secure_problem:
        fail(secure_problem)
    if config.client_num_cpus <= 0 or config.client_num_gpus < 0:
        fail(f"client_num_cpus must be > 0 and client_num_gpus >= 0, got {config.client_num_cpus} and "
             f"{config.client_num_gpus}")
    try:
        config.device = check_device(config.device)
    except DeviceError as err:
        fail(str(err))
    if config.precision not in PRECISIONS:
        fail(f"precision must be one of {PRECISIONS}, got {config.precision!r}")
    if config.update_encoding not in UPDATE_ENCODINGS:
        fail(f"update_encoding must be one of {UPDATE_ENCODINGS}, got {config.update_encoding!r}")
    if config.update_encoding != "fp32" and config.privacy.enabled:
        fail("update_encoding fp16/bf16 is not combined with privacy (clipping works on fp32 replies): "
             "set update_encoding: fp32 or privacy.enabled: false")
    if ":" not in config.system:
        fail(f"system must be 'module:Class', got {config.system!r}")
    server_training_problem = check_server_training(config.server_training)
    if server_training_problem:
        fail(server_training_problem)


def check_server_training(settings: ServerTraining) -> str | None:
    """None when the server-side fine-tuning settings are usable, else what is wrong and how to fix it."""
    if settings.epochs < 0:
        return f"server_training.epochs must be >= 0 (0: off), got {settings.epochs}"
    if (settings.lr is not None and settings.lr <= 0) or (settings.batch_size is not None and settings.batch_size < 1):
        return (f"server_training.lr must be > 0 and batch_size >= 1 (or null: the clients'), got {settings.lr} and "
                f"{settings.batch_size}")
    return None


def server_training_manifest(config: FLConfig, base: Path | None = None) -> str | None:
    """The absolute path of the server's fine-tuning manifest (None when off; a relative one resolves against
    ``base``, else the working directory); a missing file is an error now, before Ray starts or anything is written."""
    settings = config.server_training
    if not settings.epochs:
        return None
    if not settings.manifest:
        raise FLConfigError("server_training.epochs > 0 needs server_training.manifest: the train.csv the server holds "
                            "(the pipeline sets its warm-up speakers'), e.g. --set "
                            "server_training.manifest=PARTITION/warmup/train.csv")
    path = ((base or Path.cwd()) / Path(str(settings.manifest)).expanduser()).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: server_training.manifest not found (the data the server fine-tunes each "
                                "round's model on). Set it to a train.csv, or server_training.epochs: 0")
    return str(path)


def check_privacy(config: FLConfig) -> str | None:
    """None when the privacy settings are usable, else what is wrong and how to fix it."""
    p = config.privacy
    if not p.enabled:
        return None
    if config.strategy.get("name") != "fedavg":
        return (f"privacy.enabled requires strategy.name: fedavg (got {config.strategy.get('name')!r}): softmax and "
                "adaptive strategies can give one client a weight near 1, so the noise, calibrated for a weight of "
                "1 / clients_per_round, would not hide that client. Set strategy: {name: fedavg} or privacy.enabled: false")
    if config.strategy.get("server_optimizer", "sgd") != "sgd":
        return (f"privacy.enabled takes its own server step (server_lr on the noised mean); strategy.server_optimizer "
                f"{config.strategy.get('server_optimizer')!r} would be ignored: set it to sgd or privacy.enabled: false")
    if p.noise_multiplier < 0 or p.clipping_norm <= 0:
        return f"privacy needs noise_multiplier >= 0 and clipping_norm > 0, got {p.noise_multiplier} and {p.clipping_norm}"
    if not 0 < p.delta < 1:
        return f"privacy.delta must lie in (0, 1), got {p.delta}"
    if p.accounting not in ("sampled", "no-amplification", "poisson"):  # poisson: the old name of sampled
        return f"privacy.accounting must be sampled or no-amplification, got {p.accounting!r}"
    if not isinstance(p.frozen_keys, list) or not all(isinstance(k, str) for k in p.frozen_keys):
        return f"privacy.frozen_keys must be a list of key patterns, got {p.frozen_keys!r}"
    return None


SECURE_STRATEGIES = ("wer-softmax", "loss-softmax", "fedavg")


def check_secure_aggregation(config: FLConfig) -> str | None:
    """None when the secure-aggregation settings are usable, else what is wrong and how to fix it."""
    s = config.secure_aggregation
    if not s.enabled:
        return None
    name = config.strategy.get("name")
    if name not in SECURE_STRATEGIES:
        return (f"secure_aggregation works with the strategies {SECURE_STRATEGIES} (weights known before the sum), "
                f"got {name!r}: set strategy.name to one of them or secure_aggregation.enabled: false")
    if name == "wer-softmax" and config.wer_source == "server" and config.strategy.get("mix", 1.0) > 0:
        return ("secure_aggregation needs wer_source: client (with wer_source: server the server decodes every "
                "client's model, which secure aggregation exists to hide): set wer_source: client")
    if config.privacy.enabled:
        return "secure_aggregation is not combined with privacy yet: enable one of the two"
    if config.update_encoding != "fp32":
        return "secure_aggregation quantizes the updates itself: set update_encoding: fp32"
    if config.clients_per_round is not None and int(config.clients_per_round) < 2:
        return ("secure_aggregation needs clients_per_round >= 2 (the sum of one update is that update), got "
                f"{config.clients_per_round}")
    shares, threshold = s.num_shares, s.reconstruction_threshold
    if isinstance(shares, bool) or not isinstance(shares, (int, float)) or (
            isinstance(shares, int) and shares <= 2) or (isinstance(shares, float) and not 0 < shares <= 1):
        return f"secure_aggregation.num_shares must be an int > 2 or a float in (0, 1], got {shares!r}"
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or (
            isinstance(threshold, int) and not 2 <= threshold < (shares if isinstance(shares, int) else 10**9)) or (
            isinstance(threshold, float) and not 0 < threshold <= 1):
        return ("secure_aggregation.reconstruction_threshold must be an int in [2, num_shares) or a float in (0, 1], "
                f"got {threshold!r}")
    if s.clipping_range <= 0 or s.quantization_range <= 1 or s.modulus_range <= s.quantization_range or (
            s.modulus_range & (s.modulus_range - 1)) or s.modulus_range > 2**32:
        return ("secure_aggregation needs clipping_range > 0, quantization_range > 1 and modulus_range a power of 2 "
                f"above quantization_range and at most 2**32, got {s.clipping_range}, {s.quantization_range}, "
                f"{s.modulus_range}")
    return None


def strategy_name_and_settings(config: FLConfig) -> tuple[str, dict]:
    settings = dict(config.strategy)
    return str(settings.pop("name")), settings


def config_from_json(text: str) -> FLConfig:
    return config_from_dict(json.loads(text), source="run config")


def import_system_class(spec: str):
    """``"package.module:Class"`` -> the class (an ASRSystem implementation)."""
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise FLConfigError(f"cannot import the ASR system {spec!r} ({err}); set `system: module:Class` in the fl hparams") from err
