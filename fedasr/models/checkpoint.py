"""Self-contained seed checkpoint folders: what the federated stage and `fedasr evaluate` load.

Layout of a checkpoint folder::

    model.ckpt        state_dict of the AcousticModel (normaliser statistics and BatchNorm buffers included)
    tokenizer.model   the one global SentencePiece model
    hyperparams.yaml  the resolved experiment YAML the model was built from
    meta.json         model name, vocabulary sizes, dev/test WER (fractions), epochs, parameters, ...

The folder is written under a temporary name and renamed into place, so it exists complete or not at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from fedasr.models.tokenizer import TOKENIZER_FILENAME
from fedasr.utils.io import atomic_write_json, atomic_write_text, read_json

MODEL_FILENAME = "model.ckpt"
HPARAMS_FILENAME = "hyperparams.yaml"
META_FILENAME = "meta.json"
REQUIRED_FILES = (MODEL_FILENAME, TOKENIZER_FILENAME, HPARAMS_FILENAME, META_FILENAME)


class CheckpointError(FileNotFoundError):
    """A checkpoint folder that is missing or incomplete; the message says which file and how to get one."""


def export_checkpoint(out_dir: str | os.PathLike, *, state_dict: dict, tokenizer_path: str | os.PathLike,
                      resolved_yaml: str, meta: dict) -> Path:
    """Write a checkpoint folder atomically (replacing an older one)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp / MODEL_FILENAME)
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILENAME)
        atomic_write_text(tmp / HPARAMS_FILENAME, resolved_yaml)
        atomic_write_json(tmp / META_FILENAME, meta)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_checkpoint(checkpoint_dir: str | os.PathLike) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir}: checkpoint folder not found. Create one with `fedasr train-central`.")
    missing = [f for f in REQUIRED_FILES if not (checkpoint_dir / f).exists()]
    if missing:
        raise CheckpointError(
            f"{checkpoint_dir}: not a complete fedasr checkpoint (missing {missing}). "
            "Use the seed_checkpoint folder written by `fedasr train-central`."
        )
    return checkpoint_dir


def read_meta(checkpoint_dir: str | os.PathLike) -> dict:
    return read_json(check_checkpoint(checkpoint_dir) / META_FILENAME)


def load_model_state(checkpoint_dir: str | os.PathLike) -> dict:
    return torch.load(check_checkpoint(checkpoint_dir) / MODEL_FILENAME, map_location="cpu", weights_only=True)
