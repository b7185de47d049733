"""Where a run's results live: the ONE place that builds a results folder path and saves the run's identity.

A run folder is ``<root>/<dataset>/<language>/<setting>/<model>/seed<seed>`` (e.g.
``results/CommonVoice/fr/cross-silo/crdnn/seed1234``). Each holds ``run.json`` (the five fields that name it) and
the fully resolved configuration of the run (``config.yaml``) beside the files the stage itself writes.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from fedasr.utils.io import atomic_write_json, atomic_write_text, read_json

SETTINGS = ("warmup", "central", "cross-silo", "cross-device")
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ExperimentPathError(ValueError):
    """A field of a results path that cannot name a folder; the message names the field and the fix."""


@dataclass(frozen=True)
class RunId:
    """What names one run: dataset, language, setting, model and seed."""

    dataset: str
    language: str
    setting: str
    model: str
    seed: int

    def parts(self) -> tuple[str, ...]:
        return (self.dataset, self.language, self.setting, self.model, f"seed{int(self.seed)}")


def _check(run: RunId) -> None:
    if run.setting not in SETTINGS:
        raise ExperimentPathError(f"setting must be one of {SETTINGS}, got {run.setting!r}")
    for name, part in zip(("dataset", "language", "setting", "model", "seed"), run.parts()):
        if not _SAFE_PART.match(part):
            raise ExperimentPathError(
                f"{name} {part!r} cannot be a folder name: use letters, digits, '.', '_' or '-' (no '/' or spaces)")


def run_dir(root: str | os.PathLike, run: RunId) -> Path:
    """``<root>/<dataset>/<language>/<setting>/<model>/seed<seed>`` (not created)."""
    _check(run)
    return Path(root).joinpath(*run.parts())


def save_run_config(folder: str | os.PathLike, run: RunId, config: dict | str) -> Path:
    """Write ``run.json`` and the resolved ``config.yaml`` (a YAML string is saved as is); returns the folder."""
    folder = Path(folder)
    _check(run)
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    atomic_write_text(folder / CONFIG_FILE, text)
    atomic_write_json(folder / RUN_FILE, asdict(run))
    return folder


def read_run_id(folder: str | os.PathLike) -> RunId | None:
    """The run's identity from its ``run.json``, or None for a folder made without it."""
    path = Path(folder) / RUN_FILE
    if not path.exists():
        return None
    data = read_json(path)
    try:
        return RunId(str(data["dataset"]), str(data["language"]), str(data["setting"]), str(data["model"]),
                     int(data["seed"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ExperimentPathError(f"{path}: not a valid run file ({err}); delete it and re-run the stage") from None
