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

from fedasr.utils.settings import deep_merge, parse_dotted_overrides

MODES = ("cross-silo", "cross-device")
WER_SOURCES = ("server", "client")
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
class Evaluation:
    decoding: str = "greedy"  # decoding of the per-round dev evaluation
    dev_max_utterances: int | None = None  # None: the whole dev set every round
    test_every: int = 0  # 0: test WER at the end only
    test_decoding: str = "greedy"
    server_wer_utterances: int = 50  # size of the fixed server-held subset scoring each client (wer_source=server)


@dataclass
class FLConfig:
    mode: str = "cross-silo"
    rounds: int = 5
    local_epochs: int = 1
    lr: float = 0.1
    batch_size: int = 8
    seed: int = 1234
    clients_per_round: int | None = None  # None: all clients (cross-silo)
    strategy: dict = field(default_factory=lambda: {"name": "wer-softmax", "temperature": 1.0})
    wer_source: str = "server"
    annealing: Annealing = field(default_factory=Annealing)
    evaluation: Evaluation = field(default_factory=Evaluation)
    client_num_cpus: float = 1.0
    client_threads: int = 1
    round_timeout: float = 3600.0
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
        raise FLConfigError(f"{source}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    values = dict(raw)
    try:
        values["annealing"] = _typed(Annealing(**(values.get("annealing") or {})))
        values["evaluation"] = _typed(Evaluation(**(values.get("evaluation") or {})))
        config = _typed(FLConfig(**values))
    except (TypeError, ValueError) as err:
        raise FLConfigError(f"{source}: {err}. See the keys documented in hparams/fl/cross_silo.yaml.") from None
    validate(config, source)
    return config


_NUMBER_TYPES = {"float": float, "int": int, "int | None": int}


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
    if config.lr <= 0:
        fail(f"lr must be > 0, got {config.lr}")
    if config.clients_per_round is not None and int(config.clients_per_round) < 1:
        fail(f"clients_per_round must be >= 1 or null (all clients), got {config.clients_per_round}")
    if not isinstance(config.strategy, dict) or "name" not in config.strategy:
        fail("strategy must be a mapping with a name, e.g. {name: wer-softmax, temperature: 0.01}")
    if ":" not in config.system:
        fail(f"system must be 'module:Class', got {config.system!r}")


def strategy_name_and_settings(config: FLConfig) -> tuple[str, dict]:
    settings = dict(config.strategy)
    return str(settings.pop("name")), settings


def config_to_json(config: FLConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def config_from_json(text: str) -> FLConfig:
    return config_from_dict(json.loads(text), source="run config")


def import_system_class(spec: str):
    """``"package.module:Class"`` -> the class (an ASRSystem implementation)."""
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise FLConfigError(f"cannot import the ASR system {spec!r} ({err}); set `system: module:Class` in the fl hparams") from err
