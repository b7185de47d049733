"""Experiment YAML = base experiment + model YAML + small overlays + command-line overrides.

Layout (each YAML file documents itself in its header):

* ``hparams/CommonVoice/base.yaml``: the experiment (data paths, tokenizer, training, decoding settings) and
  ``model: <name>``;
* ``hparams/models/<name>.yaml``: one acoustic model (its modules, the roles they play, decoding options);
* ``hparams/CommonVoice/<lang>.yaml``: an overlay that starts with ``extends: base.yaml`` and holds only the
  keys that differ (language, vocabulary size, ...). Overlays may extend other overlays.

Composition is textual and keeps HyperPyYAML tags: the base's top-level blocks, then the model's blocks (a key
in both is an error), then each overlay replaces whole top-level blocks (a key that exists nowhere is an error).
Command-line overrides (``--key=value`` as SpeechBrain takes them, or ``--set key=value`` as every fedasr command
takes them, dotted where the YAML nests) are then applied by HyperPyYAML with ``overrides_must_match`` (unknown
keys are errors).
``model`` may name a YAML in ``hparams/models`` or be a path to a model YAML.

``extends`` means the same in every fedasr YAML (this file's keys over its parent's), at the depth the file allows:
an experiment's top-level blocks are HyperPyYAML objects (``!new:`` constructors, ``!ref`` links) that cannot be
merged field by field, so an overlay replaces a whole block; the federated settings (hparams/fl, fedasr.fl.config)
are plain data, so a nested key there replaces just that key.
"""

from __future__ import annotations

import io
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import ruamel.yaml
import torch
from hyperpyyaml import load_hyperpyyaml, resolve_references

from fedasr.utils.settings import check_settings, deep_merge, did_you_mean, parse_dotted_overrides, read_value

_TOP_LEVEL_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:")
EXTENDS_KEY = "extends"
MODEL_KEY = "model"
SEED_KEY = "seed"


class HparamsError(ValueError):
    """An experiment YAML or override that cannot be used; the message names the file/key and the fix."""


@dataclass
class Experiment:
    hparams: dict  # built objects (modules, optimizer class, ...) and plain values
    resolved_yaml: str  # the composed YAML with overrides and references resolved: saved with every run
    model_name: str
    source: Path


SET_OPTION = "--set"


def parse_overrides(args: Sequence[str] | str | dict | None) -> dict:
    """Command-line overrides -> dict: SpeechBrain's ``--key=value`` / ``--key value``, fedasr's ``--set key=value``
    (``--set=key=value``; dotted keys where the YAML nests: ``--set decoding.beam_size=8``), YAML mapping strings;
    or a YAML mapping string, or a dict.

    ``["--number_of_epochs=3", "--lr", "0.5", "--set", "decoding.beam_size=8"]`` ->
    ``{"number_of_epochs": 3, "lr": 0.5, "decoding": {"beam_size": 8}}``. Every value is read by the YAML 1.2 reader
    HyperPyYAML reads the experiment with, so ``--set lr=1e-3`` equals ``--lr=1e-3``; ``--set`` goes through the
    parser of every fedasr ``--set`` option (:func:`fedasr.utils.settings.parse_dotted_overrides`). Items apply in
    order: a key given twice keeps the later value, a dotted one merges into its section.
    """
    if args is None:
        return {}
    if isinstance(args, dict):
        return dict(args)
    if isinstance(args, str):
        return _yaml_mapping(args, "override string")
    overrides: dict[str, Any] = {}
    items = list(args)
    i = 0
    while i < len(items):
        item = items[i]
        if item == SET_OPTION or item.startswith(SET_OPTION + "="):
            if item == SET_OPTION:
                if i + 1 >= len(items):
                    raise HparamsError(f"{SET_OPTION} has no KEY=VALUE after it: write e.g. "
                                       f"{SET_OPTION} number_of_epochs=3.")
                pair, i = items[i + 1], i + 1
            else:
                pair = item[len(SET_OPTION) + 1:]
            try:
                given = parse_dotted_overrides([pair], example=f"{SET_OPTION} number_of_epochs=3", load=_read_value)
            except ValueError as err:
                raise HparamsError(str(err)) from None
        elif item.startswith("--"):
            key, eq, value = item[2:].partition("=")
            if not eq:
                if i + 1 >= len(items):
                    raise HparamsError(f"override --{key} has no value: write --{key}=VALUE.")
                value, i = items[i + 1], i + 1
            given = {key: _yaml_value(value, f"override --{key}")}
        else:
            given = _yaml_mapping(item, f"override {item!r}")
        for key, value in given.items():  # later wins; a dotted --set merges into the section given before it
            overrides[key] = deep_merge(overrides[key], value) if isinstance(value, dict) and isinstance(
                overrides.get(key), dict) else value
        i += 1
    return overrides


_read_value = read_value  # one command-line value, read as HyperPyYAML reads the experiment (YAML 1.2)


def _yaml_value(text: str, what: str) -> Any:
    try:
        return _read_value(text)
    except ruamel.yaml.YAMLError as err:
        raise HparamsError(f"{what}: {text!r} is not a YAML value ({getattr(err, 'problem', None) or err})") from None


def _yaml_mapping(text: str, what: str) -> dict:
    try:
        data = ruamel.yaml.YAML(typ="safe", pure=True).load(text)
    except ruamel.yaml.YAMLError as err:
        raise HparamsError(f"{what} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HparamsError(f"{what} must be a YAML mapping like 'key: value' or --key=value.")
    return data


def split_blocks(text: str) -> dict[str, str]:
    """Top-level ``key -> block text`` of a YAML document (leading comments are kept under the key "")."""
    blocks: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines(keepends=True):
        match = _TOP_LEVEL_KEY.match(line)
        if match:
            current = match.group(1)
            blocks[current] = []
        blocks[current].append(line)
    return {k: "".join(v) for k, v in blocks.items()}


def _block_value(block: str, path: Path, key: str) -> Any:
    try:
        return ruamel.yaml.YAML(typ="safe", pure=True).load(block)[key]
    except Exception as err:  # noqa: BLE001 - any parse problem is reported with its file
        raise HparamsError(f"{path}: key '{key}' must be a plain value: {err}") from None


def _read_chain(path: Path) -> list[tuple[Path, dict[str, str]]]:
    """[(file, blocks)] from the root base to ``path`` following ``extends`` keys."""
    chain: list[tuple[Path, dict[str, str]]] = []
    seen: set[Path] = set()
    while True:
        path = path.resolve()
        if not path.exists():
            raise HparamsError(f"{path}: hparams file not found.")
        if path in seen:
            raise HparamsError(f"{path}: 'extends' forms a cycle.")
        seen.add(path)
        blocks = split_blocks(path.read_text(encoding="utf-8"))
        chain.insert(0, (path, blocks))
        if EXTENDS_KEY not in blocks:
            return chain
        parent = _block_value(blocks.pop(EXTENDS_KEY), path, EXTENDS_KEY)
        path = path.parent / str(parent)


def model_yaml_path(model: str, experiment_file: Path) -> Path:
    """``model`` as a path to a YAML, or a name looked up in the ``models`` folder beside the experiment's folder."""
    if model.endswith((".yaml", ".yml")):
        candidates = [Path(model), experiment_file.parent / model]
    else:
        candidates = [experiment_file.parent.parent / "models" / f"{model}.yaml", experiment_file.parent / "models" / f"{model}.yaml"]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    folder = candidates[0].parent
    known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    raise HparamsError(
        f"{experiment_file}: model '{model}' not found (looked for {', '.join(map(str, candidates))}). "
        f"Known models: {known}; or pass a path to a model YAML (--model=path/to/model.yaml)."
    )


def compose_yaml(experiment_file: str | os.PathLike, model: str | None = None) -> tuple[str, str]:
    """Compose base + model + overlays into one YAML text; returns (text, model name)."""
    chain = _read_chain(Path(experiment_file))
    root_path, root_blocks = chain[0]
    if model is None:
        for path, blocks in reversed(chain):
            if MODEL_KEY in blocks:
                model = str(_block_value(blocks[MODEL_KEY], path, MODEL_KEY))
                break
    if model is None:
        raise HparamsError(f"{experiment_file}: no '{MODEL_KEY}:' key; name a model (e.g. model: crdnn_tiny).")
    model_path = model_yaml_path(model, root_path)
    model_blocks = split_blocks(model_path.read_text(encoding="utf-8"))
    clash = sorted((set(model_blocks) & set(root_blocks)) - {""})
    if clash:
        raise HparamsError(f"{model_path}: keys {clash} are already defined by {root_path}; rename them in the model YAML.")
    blocks = {**root_blocks, **{k: v for k, v in model_blocks.items() if k}}
    blocks[""] = root_blocks.get("", "")
    schema = override_schema("".join(blocks.values()), nested=False)
    for path, overlay in chain[1:]:
        for key, block in overlay.items():
            if not key:
                continue
            if key not in blocks:
                valid = sorted(k for k in blocks if k)
                raise HparamsError(
                    f"{path}: key '{key}' is not defined by the base experiment or the model YAML "
                    f"({model_path.name}){did_you_mean([key], valid)}; valid keys: {valid}."
                )
            check_override_keys("", {key: _plain_value(block, key)}, str(path), schema)
            blocks[key] = block if block.endswith("\n") else block + "\n"
    text = "".join(b if b.endswith("\n") or not b else b + "\n" for b in blocks.values())
    return text, Path(model).stem if model.endswith((".yaml", ".yml")) else model


def _plain_value(block: str, key: str) -> Any:
    """The value of a top-level block, or None when it is tagged (``!new:``, ``!ref``, ``!PLACEHOLDER``)."""
    try:
        return ruamel.yaml.YAML(typ="safe", pure=True).load(block)[key]
    except Exception:  # noqa: BLE001 - a tagged block: HyperPyYAML checks it when it builds
        return None


def override_schema(text: str, nested: bool = True) -> dict:
    """The keys an override may set in a composed YAML, with the type a plain number or true/false there keeps.

    A number may be replaced by a number or null, true/false by true/false or null; tagged values, text and null
    accept anything, as HyperPyYAML does. Checked up front: a number given as text fails only when training starts.
    ``nested``: the keys of a plain (untagged) mapping such as ``decoding`` are checked too, as a mapping of their
    own: HyperPyYAML merges a nested override (``--set decoding.beam_size=8``) into the mapping and checks only the
    top-level keys, so a typo below would pass silently. Overlays replace whole blocks: their check is not nested."""
    def value_schema(value):
        if isinstance(value, bool):
            return (bool, type(None))
        if isinstance(value, (int, float)):
            return (float, type(None))
        if nested and isinstance(value, dict) and value:
            return {str(k): value_schema(v) for k, v in value.items()}
        return None

    return {key: value_schema(_plain_value(block, key)) for key, block in split_blocks(text).items() if key}


def check_override_keys(text: str, overrides: dict, source: str, schema: dict | None = None) -> None:
    """Unknown keys (with a "did you mean") and numbers / true-false overridden by text are errors naming ``source``.

    The valid keys are those of ``text`` (or of a ``schema`` made by :func:`override_schema`)."""
    check_settings(overrides, override_schema(text) if schema is None else schema, source=source, complete=False,
                   fix="Its keys and defaults are in that YAML and its model YAML (hparams/models).",
                   error=HparamsError)


def load_experiment(experiment_file: str | os.PathLike, overrides: Sequence[str] | str | dict | None = None) -> Experiment:
    """Compose, override and build an experiment. Building has no side effects (no folders are created)."""
    overrides = parse_overrides(overrides)
    text, model_name = compose_yaml(experiment_file, overrides.get(MODEL_KEY))
    overrides.pop(MODEL_KEY, None)
    overrides[MODEL_KEY] = model_name
    check_override_keys(text, overrides, str(experiment_file))
    return build_from_text(text, overrides, source=Path(experiment_file), model_name=model_name)


def seed_from_yaml(resolved_yaml: str, source: Path) -> None:
    """Seed Python's and torch's generators with the YAML's top-level ``seed`` (if any)."""
    block = split_blocks(resolved_yaml).get(SEED_KEY)
    if block is None:
        return
    seed = int(_block_value(block, source, SEED_KEY))
    random.seed(seed)
    torch.manual_seed(seed)


def build_from_text(text: str, overrides: dict | None, *, source: Path, model_name: str | None = None) -> Experiment:
    """Resolve references + overrides of a composed (or saved, resolved) YAML and build its objects.

    Generators are seeded from the YAML's ``seed`` first, so the initial weights are reproducible."""
    overrides = dict(overrides or {})
    check_override_keys(text, overrides, str(source))
    try:
        resolved = resolve_references(io.StringIO(text), overrides, overrides_must_match=True).getvalue()
        seed_from_yaml(resolved, source)  # modules are initialised while the YAML loads: seed before
        hparams = load_hyperpyyaml(resolved)
    except KeyError as err:
        raise HparamsError(f"{source}: {err.args[0] if err.args else err}") from None
    except ValueError as err:
        raise HparamsError(f"{source}: {err} (pass the missing value as an override, e.g. --output_folder=DIR)") from None
    return Experiment(hparams, resolved, model_name or str(hparams.get(MODEL_KEY, "")), source)
