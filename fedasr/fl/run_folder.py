"""The files of a federated run folder (``fedasr federate --output-dir``, ``flwr run``'s ``output-dir``) and the
format of its model files; read by the server that writes them and by ``fedasr evaluate`` / ``compare``.

Light on purpose (no Flower import; torch only when a model file is read or written)."""

from __future__ import annotations

from pathlib import Path

from fedasr.utils.io import atomic_open

SUMMARY_FILE = "summary.json"
BEST_MODEL_FILE = "best_model.pt"  # the round chosen by dev WER (the seed competing)
FINAL_MODEL_FILE = "final_model.pt"  # the last round's
RESOLVED_CONFIG_FILE = "fl_config.json"  # the resolved settings; names the seed checkpoint the weights belong to


class ModelFileError(FileNotFoundError):
    """A model file that cannot be read as one of a federated run."""


def save_model_file(path: Path, state: dict, server_round: int, dev_wer: float) -> None:
    """``{"state_dict", "round", "dev_wer"}``, written atomically."""
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save({"state_dict": state, "round": server_round, "dev_wer": dev_wer}, handle)


def load_model_file(path: Path) -> dict:
    """The state dict of a model file written by :func:`save_model_file`; a clear error for anything else."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ModelFileError(f"{path}: not a readable model file ({err}); use {BEST_MODEL_FILE} or "
                             f"{FINAL_MODEL_FILE} of a federated run") from None
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise ModelFileError(f"{path}: no state_dict in it; use {BEST_MODEL_FILE} or {FINAL_MODEL_FILE} of a "
                             "federated run")
    return saved["state_dict"]
