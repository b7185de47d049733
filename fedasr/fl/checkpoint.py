"""Full server state after every round, written atomically, so a killed run resumes exactly where it was.

One file, ``<output>/checkpoints/server_state.pt``: round number, global arrays, the strategy's ``state_dict()``
(server optimizer moments for FedAdam/FedYogi/FedAvgM, see fedasr/fl/strategies/base.py), annealer state, RNG
states (python, numpy, torch) and the best dev WER so far. It is replaced (temp file + rename) only once a round is
complete.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedasr.models.checkpoint import CheckpointError
from fedasr.utils.io import atomic_open

CHECKPOINT_NAME = "server_state.pt"
FORMAT_VERSION = 1  # the strategy entry of format 1 is what the strategies' state_dict() writes


class ServerStateError(CheckpointError, ValueError):
    """A server checkpoint that cannot be used to resume; the message names the file and the fix."""


@dataclass
class ServerState:
    round: int
    arrays: dict[str, np.ndarray]
    strategy: dict = field(default_factory=dict)
    annealer: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    best_wer: float = float("inf")
    best_round: int = 0
    fingerprint: dict = field(default_factory=dict)  # settings that must not change across a resume
    average: dict = field(default_factory=dict)  # the evaluated moving average of the global models (ema_decay > 0)


def checkpoint_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints" / CHECKPOINT_NAME


def capture_rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def restore_strategy_state(strategy, state: ServerState, path: str | Path) -> None:
    """``strategy.load_state_dict`` of the checkpoint's strategy state; a state the strategy cannot take is a
    ServerStateError naming the file."""
    try:
        strategy.load_state_dict(state.strategy)
    except (ValueError, KeyError, TypeError) as err:
        raise ServerStateError(f"{path}: the strategy state does not fit this run's strategy ({err}); resume with "
                               "the original settings, or start a fresh run in another --output-dir.") from err


def save_server_state(output_dir: str | Path, state: ServerState) -> Path:
    """Write ``state`` atomically; returns the file."""
    path = checkpoint_path(output_dir)
    payload = {"format": FORMAT_VERSION, **state.__dict__}
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return path


def load_server_state(output_dir: str | Path) -> ServerState | None:
    """The last complete round's state, or None when the run has no checkpoint yet."""
    path = checkpoint_path(output_dir)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as err:  # a truncated or foreign file
        raise ServerStateError(
            f"{path}: cannot read the server checkpoint ({err}). Delete it to start over, or restore it from a backup."
        ) from err
    if payload.pop("format", None) != FORMAT_VERSION:
        raise ServerStateError(f"{path}: written by another fedasr version; start the run again in a new --output-dir.")
    return ServerState(**payload)


def check_resumable(state: ServerState, fingerprint: dict, path: str | Path) -> None:
    """Refuse to resume when settings that shape the result changed since the checkpoint (a key the checkpoint
    does not hold, written by an older fedasr, is not compared)."""
    changed = {k: (state.fingerprint[k], v) for k, v in fingerprint.items()
               if k in state.fingerprint and state.fingerprint[k] != v}
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ServerStateError(
            f"{path}: cannot resume, settings changed since the checkpoint ({details}). Resume with the original "
            "settings, or start a fresh run in another --output-dir."
        )
