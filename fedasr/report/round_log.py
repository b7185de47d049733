"""Per-round metrics of a federated run where users look for them: SpeechBrain's train_log.txt and TensorBoard.

Built from the run's ``metrics.jsonl`` alone (so it can be regenerated for any run, old or new): one line per
round, ``round: N, lr: X - train loss: ... - valid WER: ... - test WER: ...`` (WER in percent, as SpeechBrain
logs it), and, when the ``tensorboard`` package is installed, event files under ``tensorboard/`` written by
SpeechBrain's TensorboardLogger.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from fedasr.fl.metrics_log import MetricsRow
from fedasr.utils.io import atomic_write_text

TRAIN_LOG_FILE = "train_log.txt"
TENSORBOARD_DIR = "tensorboard"


def round_stats(row: MetricsRow) -> tuple[dict, dict, dict, dict]:
    """(meta, train, valid, test) stats of one metrics.jsonl row, in SpeechBrain's logging shape."""
    meta = {"round": int(row["round"]), "lr": float(row.get("lr", 0.0))}
    train = {"loss": float(row["train_loss"])} if row.get("train_loss") is not None else {}
    valid = {"WER": 100 * float(row["dev_wer"])}
    if row.get("dev_cer") is not None:
        valid["CER"] = 100 * float(row["dev_cer"])
    test = {"WER": 100 * float(row["test_wer"])} if row.get("test_wer") is not None else {}
    return meta, train, valid, test


def write_round_logs(run_dir: str | os.PathLike, rows: list[MetricsRow]) -> dict:
    """Rewrite ``train_log.txt`` (and TensorBoard events when available) in ``run_dir`` from ``rows``."""
    from speechbrain.utils.train_logger import FileTrainLogger

    run_dir = Path(run_dir)
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        scratch = Path(tmp) / TRAIN_LOG_FILE
        logger = FileTrainLogger(save_file=str(scratch))
        for row in rows:
            meta, train, valid, test = round_stats(row)
            logger.log_stats(meta, train_stats=train or None, valid_stats=valid, test_stats=test or None)
        atomic_write_text(run_dir / TRAIN_LOG_FILE, scratch.read_text(encoding="utf-8") if scratch.exists() else "")
    written = {"train_log": str(run_dir / TRAIN_LOG_FILE), "tensorboard": None}
    if importlib.util.find_spec("tensorboard") is not None:
        written["tensorboard"] = str(write_tensorboard(run_dir / TENSORBOARD_DIR, rows))
    return written


def write_tensorboard(folder: Path, rows: list[MetricsRow]) -> Path:
    """Fresh event files (the folder is replaced) with one step per round."""
    from speechbrain.utils.train_logger import TensorboardLogger

    if folder.exists():
        shutil.rmtree(folder)
    logger = TensorboardLogger(save_dir=str(folder))
    for row in rows:
        meta, train, valid, test = round_stats(row)
        logger.log_stats(meta, train_stats=train or None, valid_stats=valid, test_stats=test or None)
    logger.writer.flush()
    logger.writer.close()
    return folder
