"""Self-contained seed checkpoint folders: what the federated stage and `fedasr evaluate` load.

Layout of a checkpoint folder::

    model.ckpt        state_dict of the AcousticModel (normaliser statistics and BatchNorm buffers included)
    tokenizer.model   the one global SentencePiece model
    hyperparams.yaml  the resolved experiment YAML the model was built from
    meta.json         model name, vocabulary sizes, dev/test WER (fractions), epochs, parameters, the
                      tokenizer's sha256, ...

The folder is written under a temporary name and renamed into place, so it exists complete or not at all.
Loading checks that the parts belong together (:func:`load_model_state` with ``model=``): weights whose names or
shapes do not fit the model its YAML builds, or a tokenizer other than the one the model was trained with (its
sha256 in meta.json, or its size for older folders), are a :class:`CheckpointMismatchError` naming both sides,
not a torch size-mismatch trace or, worse, a model that silently decodes with the wrong vocabulary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fedasr.models.tokenizer import TOKENIZER_FILENAME, Tokenizer
from fedasr.utils.io import atomic_write_json, atomic_write_text, read_json

MODEL_FILENAME = "model.ckpt"
HPARAMS_FILENAME = "hyperparams.yaml"
META_FILENAME = "meta.json"
REQUIRED_FILES = (MODEL_FILENAME, TOKENIZER_FILENAME, HPARAMS_FILENAME, META_FILENAME)


class CheckpointError(Exception):
    """A checkpoint fedasr cannot use (a model folder here, a federated run's server state in fedasr.fl.checkpoint);
    the message names the file and the fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint folder that is missing or incomplete; the message says which file and how to get one."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """Checkpoint parts that do not belong together (weights vs YAML, tokenizer vs model); names both sides."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        atomic_write_json(tmp / META_FILENAME, {**meta, "tokenizer_sha256": file_sha256(tmp / TOKENIZER_FILENAME)})
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
        raise CheckpointNotFoundError(f"{checkpoint_dir}: checkpoint folder not found. Create one with `fedasr train-central`.")
    missing = [f for f in REQUIRED_FILES if not (checkpoint_dir / f).exists()]
    if missing:
        raise CheckpointNotFoundError(
            f"{checkpoint_dir}: not a complete fedasr checkpoint (missing {missing}). "
            "Use the seed_checkpoint folder written by `fedasr train-central`."
        )
    return checkpoint_dir


def read_meta(checkpoint_dir: str | os.PathLike) -> dict:
    return read_json(check_checkpoint(checkpoint_dir) / META_FILENAME)


def load_model_state(checkpoint_dir: str | os.PathLike, model: torch.nn.Module | None = None) -> dict:
    """The saved state dict; with ``model`` (built from the folder's YAML), first check that weights and tokenizer
    fit it (:class:`CheckpointMismatchError` otherwise)."""
    checkpoint_dir = check_checkpoint(checkpoint_dir)
    try:
        state = torch.load(checkpoint_dir / MODEL_FILENAME, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
        raise CheckpointMismatchError(
            f"{checkpoint_dir / MODEL_FILENAME}: not a readable torch state dict ({type(err).__name__}: "
            f"{str(err)[:200]}). Re-export the checkpoint with `fedasr train-central`."
        ) from None
    if model is not None:
        meta = read_meta(checkpoint_dir)
        _check_weights_fit(checkpoint_dir, state, model, meta)
        _check_tokenizer_fits(checkpoint_dir, model, meta)
    return state


def check_resume_fits(save_folder: str | os.PathLike, model: torch.nn.Module) -> None:
    """Before a centralized run resumes from ``save_folder`` (its tokenizer and SpeechBrain ``CKPT+*`` folders),
    check that the tokenizer and the latest checkpoint fit ``model``: an output folder reused with another model
    or vocabulary is a :class:`CheckpointMismatchError` before anything is overwritten, not a torch size-mismatch
    trace in the middle of the recovery."""
    save_folder = Path(save_folder)
    fix = (f"Resume with the settings of the run that wrote {save_folder}, or start this one in another "
           "--output_folder (or delete that folder).")
    tokenizer_path = save_folder / TOKENIZER_FILENAME
    if tokenizer_path.exists():
        _check_vocab_fits(tokenizer_path, Tokenizer(tokenizer_path).vocab_size, model, fix)
    checkpoints = sorted(save_folder.glob("CKPT+*"), key=lambda p: p.stat().st_mtime)
    if not checkpoints or not (checkpoints[-1] / MODEL_FILENAME).exists():
        return
    latest = checkpoints[-1] / MODEL_FILENAME
    state = torch.load(latest, map_location="cpu", weights_only=True)
    problem = _state_mismatch(state, model)
    if problem:
        raise CheckpointMismatchError(
            f"{latest} does not fit the model built from {_describe_model(model)}: {problem}. {fix}"
        )


def _state_mismatch(state: dict, model: torch.nn.Module) -> str:
    """What differs between a saved state dict and ``model`` ("" when it fits)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    # Empty buffers (normaliser statistics of a fresh model) take the checkpoint's shape when loaded.
    wrong = sorted(k for k in set(own) & set(state) if own[k].numel() and own[k].shape != state[k].shape)
    if not (missing or unexpected or wrong):
        return ""
    shapes = ", ".join(f"{k}: {tuple(state[k].shape)} in the checkpoint vs {tuple(own[k].shape)}" for k in wrong[:3])
    return (f"{len(missing)} parameter(s) missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(wrong)} of another shape [{shapes}]")


def _check_vocab_fits(tokenizer_path: Path, vocab: int, model: torch.nn.Module, fix: str) -> None:
    outputs = getattr(model, "output_neurons", None)
    if outputs is not None and vocab > outputs:
        raise CheckpointMismatchError(
            f"{tokenizer_path} has {vocab} tokens but the model built from {_describe_model(model)} outputs only "
            f"{outputs} units: it is another run's tokenizer. {fix}"
        )


def _describe_model(model: torch.nn.Module) -> str:
    return f"{getattr(model, 'source', type(model).__name__)} (output_neurons={getattr(model, 'output_neurons', '?')})"


def _check_weights_fit(checkpoint_dir: Path, state: dict, model: torch.nn.Module, meta: dict) -> None:
    problem = _state_mismatch(state, model)
    if problem:
        raise CheckpointMismatchError(
            f"{checkpoint_dir / MODEL_FILENAME} does not fit the model built from {_describe_model(model)} "
            f"(meta.json records model {meta.get('model')!r}, vocab_size {meta.get('vocab_size')}): {problem}. "
            "Use a checkpoint folder exactly as `fedasr train-central` exported it (do not mix files of different "
            "runs) and no overrides that change the model."
        )


def _check_tokenizer_fits(checkpoint_dir: Path, model: torch.nn.Module, meta: dict) -> None:
    tokenizer_path = checkpoint_dir / TOKENIZER_FILENAME
    vocab = Tokenizer(tokenizer_path).vocab_size
    fix = "Use the tokenizer.model exported with these weights (the one global tokenizer of the warm-up run)."
    _check_vocab_fits(tokenizer_path, vocab, model, fix)
    recorded_sha, recorded_vocab = meta.get("tokenizer_sha256"), meta.get("tokenizer_vocab_size")
    if recorded_sha is not None:
        actual_sha = file_sha256(tokenizer_path)
        if actual_sha != recorded_sha:
            raise CheckpointMismatchError(
                f"{tokenizer_path} (sha256 {actual_sha[:12]}..., {vocab} tokens) is not the tokenizer the weights "
                f"were trained with ({checkpoint_dir / META_FILENAME}: sha256 {recorded_sha[:12]}..., "
                f"{recorded_vocab} tokens). {fix}"
            )
    elif recorded_vocab is not None and int(recorded_vocab) != vocab:
        raise CheckpointMismatchError(
            f"{tokenizer_path} has {vocab} tokens but the weights were trained with a tokenizer of "
            f"{recorded_vocab} tokens ({checkpoint_dir / META_FILENAME}). {fix}"
        )
