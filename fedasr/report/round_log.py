"""Per-round metrics of a federated run where users look for them: SpeechBrain's train_log.txt, TensorBoard and
the console.

Built from the run's ``metrics.jsonl`` rows (so they can be regenerated for any run, old or new):

* ``train_log.txt``: one line per round, ``round: N, lr: X - train loss: ... - valid WER: ... - test WER: ...``
  (WER in percent, as SpeechBrain logs it);
* ``tensorboard/``: event files (when the ``tensorboard`` package is installed) whose step is the round (0 = the
  seed model). A live run (:class:`RoundLogs`) appends each round's events as the round ends; a resumed run
  hides (TensorBoard's ``purge_step``) the events of rounds after its checkpoint, so no round is shown twice;
* the console: one line per round (:meth:`RoundLogs.announce`), and a progress bar over the rounds when stdout
  and stderr are terminals.

TensorBoard tags (:data:`TAGS`), the same for federated runs (step = round) and ``fedasr train-central`` (step =
epoch, written by :class:`StepTensorboardLogger` into ``<output_folder>/tensorboard``), so both overlay:
``WER/valid``, ``CER/valid`` (dev set, percent), ``loss/train``, ``WER/test``, ``CER/test`` (test set, percent;
federated: the rounds that were tested; central: at the epoch of the model tested) and ``lr`` (the learning rate
the round or epoch trained with).
"""

from __future__ import annotations

import importlib.util
import logging
import numbers
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fedasr.fl.metrics_log import MetricsRow
from fedasr.utils.io import atomic_write_text

log = logging.getLogger(__name__)

TRAIN_LOG_FILE = "train_log.txt"
TENSORBOARD_DIR = "tensorboard"

# tag -> what it holds (README, monitoring). SpeechBrain's own names: f"{stat}/{dataset}" and the meta keys.
TAGS = {
    "WER/valid": "dev WER, percent",
    "CER/valid": "dev CER, percent",
    "loss/train": "training loss (federated: the clients' loss weighted by examples)",
    "WER/test": "test WER, percent (the rounds or the epoch tested)",
    "CER/test": "test CER, percent",
    "lr": "learning rate the round (the clients) or the epoch trained with",
}
# stats_meta keys that are a step, not a scalar: the federated round, the central epoch, SpeechBrain's test record.
STEP_KEYS = ("round", "epoch", "Epoch loaded")


def round_stats(row: MetricsRow) -> tuple[dict, dict, dict, dict]:
    """(meta, train, valid, test) stats of one metrics.jsonl row, in SpeechBrain's logging shape."""
    meta = {"round": int(row["round"]), "lr": float(row.get("lr", 0.0))}
    train = {"loss": float(row["train_loss"])} if row.get("train_loss") is not None else {}
    valid = {"WER": 100 * float(row["dev_wer"])}
    if row.get("dev_cer") is not None:
        valid["CER"] = 100 * float(row["dev_cer"])
    test = {"WER": 100 * float(row["test_wer"])} if row.get("test_wer") is not None else {}
    if test and row.get("test_cer") is not None:
        test["CER"] = 100 * float(row["test_cer"])
    return meta, train, valid, test


def tensorboard_scalars(stats_meta: dict, train_stats: dict | None = None, valid_stats: dict | None = None,
                        test_stats: dict | None = None) -> tuple[int | None, list[tuple[str, float]]]:
    """(step, [(tag, value), ...]) of one SpeechBrain ``log_stats`` call: the step is the round, epoch or loaded
    epoch of ``stats_meta`` (None without one); the other meta keys are scalars under their own name, the stats
    ``f"{stat}/{dataset}"`` as SpeechBrain's TensorboardLogger names them. Per-batch lists are not supported."""
    step = next((int(stats_meta[key]) for key in STEP_KEYS if stats_meta.get(key) is not None), None)
    scalars = [(name, float(value)) for name, value in stats_meta.items()
               if name not in STEP_KEYS and isinstance(value, numbers.Real)]
    for dataset, stats in (("train", train_stats), ("valid", valid_stats), ("test", test_stats)):
        for stat, value in (stats or {}).items():
            if isinstance(value, numbers.Real):
                scalars.append((f"{stat}/{dataset}", float(value)))
    return step, scalars


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def has_events(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("events.out.tfevents.*"))


class StepTensorboardLogger:
    """SpeechBrain ``TrainLogger`` whose TensorBoard step is the round or epoch of each record (SpeechBrain's own
    TensorboardLogger counts calls per tag instead, so its steps drift from the rounds).

    The event file is opened at the first record. ``purge_step``: events of that step and later, left by an
    earlier process in the folder, are hidden (a resumed run redoes them); None: the first epoch/round record's
    step when the folder already holds events (a resumed ``train-central``)."""

    def __init__(self, save_dir: str | os.PathLike, purge_step: int | None = None) -> None:
        self.save_dir = Path(save_dir)
        self.purge_step = purge_step
        self.writer = None

    def _open(self, first_step: int | None, is_progress: bool):
        from torch.utils.tensorboard import SummaryWriter

        purge = self.purge_step
        if purge is None and is_progress and first_step is not None and has_events(self.save_dir):
            purge = first_step
        self.writer = SummaryWriter(str(self.save_dir), purge_step=purge)
        return self.writer

    def log_stats(self, stats_meta, train_stats=None, valid_stats=None, test_stats=None, verbose=False) -> None:
        step, scalars = tensorboard_scalars(stats_meta, train_stats, valid_stats, test_stats)
        writer = self.writer or self._open(step, is_progress="Epoch loaded" not in stats_meta)
        for tag, value in scalars:
            writer.add_scalar(tag, value, global_step=step)
        writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TrainLoggers:
    """Several SpeechBrain train loggers as one (``hparams.train_logger``): a text log and TensorBoard."""

    def __init__(self, *loggers) -> None:
        self.loggers = [logger for logger in loggers if logger is not None]

    def log_stats(self, stats_meta, train_stats=None, valid_stats=None, test_stats=None, verbose=True) -> None:
        for logger in self.loggers:
            logger.log_stats(stats_meta, train_stats=train_stats, valid_stats=valid_stats, test_stats=test_stats,
                             verbose=verbose)

    def close(self) -> None:
        for logger in self.loggers:
            if hasattr(logger, "close"):
                logger.close()


def write_train_log(run_dir: str | os.PathLike, rows: list[MetricsRow]) -> Path:
    """Rewrite ``train_log.txt`` in ``run_dir`` from ``rows`` (atomic; nothing logged: the console has its own
    line per round)."""
    from speechbrain.utils.train_logger import FileTrainLogger

    run_dir = Path(run_dir)
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        scratch = Path(tmp) / TRAIN_LOG_FILE
        logger = FileTrainLogger(save_file=str(scratch))
        for row in rows:
            meta, train, valid, test = round_stats(row)
            logger.log_stats(meta, train_stats=train or None, valid_stats=valid, test_stats=test or None,
                             verbose=False)
        atomic_write_text(run_dir / TRAIN_LOG_FILE, scratch.read_text(encoding="utf-8") if scratch.exists() else "")
    return run_dir / TRAIN_LOG_FILE


def write_round_logs(run_dir: str | os.PathLike, rows: list[MetricsRow]) -> dict:
    """Regenerate ``train_log.txt`` and the TensorBoard events of ``run_dir`` from ``rows`` (e.g. for a run made
    before these files existed); a live run appends instead (:class:`RoundLogs`)."""
    run_dir = Path(run_dir)
    written = {"train_log": str(write_train_log(run_dir, rows)), "tensorboard": None}
    if tensorboard_available():
        written["tensorboard"] = str(write_tensorboard(run_dir / TENSORBOARD_DIR, rows))
    return written


def write_tensorboard(folder: Path, rows: list[MetricsRow]) -> Path:
    """Fresh event files (the folder is replaced) with step = round."""
    if folder.exists():
        shutil.rmtree(folder)
    logger = StepTensorboardLogger(folder)
    for row in rows:
        meta, train, valid, test = round_stats(row)
        logger.log_stats(meta, train_stats=train, valid_stats=valid, test_stats=test)
    logger.close()
    return folder


def round_line(row: MetricsRow, rounds: int) -> str:
    """The console line of one round: ``round 2/5: dev WER 53.71 % (best 53.71 % @ 2), train loss 0.462, lr 0.002,
    28.1 s`` (``lr 0.002 (next 0.001)`` when NewBob anneals it); round 0 is the seed model."""
    parts = [f"round {row['round']}/{rounds}: dev WER {100 * row['dev_wer']:.2f} %"]
    if row.get("best_round") is not None:
        parts[0] += f" (best {100 * row['best_dev_wer']:.2f} % @ {row['best_round']})"
    if row["round"] == 0:
        parts[0] += " (seed model)"
    if row.get("test_wer") is not None:
        parts.append(f"test WER {100 * row['test_wer']:.2f} %")
    if row.get("round_skipped"):
        parts.append("skipped (too few clients)")
    elif row.get("train_loss") is not None:
        parts.append(f"train loss {row['train_loss']:.3g}")
    if row["round"] > 0:
        lr, next_lr = row.get("lr", 0.0), row.get("next_lr")
        parts.append(f"lr {lr:.3g}" + (f" (next {next_lr:.3g})" if next_lr is not None and next_lr != lr else ""))
    seconds = (row.get("seconds") or {}).get("round")
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    return ", ".join(parts)


def interactive_console() -> bool:
    """A terminal on both stdout and stderr (not a pipe, a file or CI): the progress bar is shown."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class RoundLogs:
    """The logs of a live federated run, one round at a time: ``train_log.txt`` (rewritten from the rows),
    TensorBoard (events appended, step = round), the console line and the progress bar.

    ``rows``: the metrics rows the run starts from (``[seed]`` for a fresh run, the rows up to the checkpoint for a
    resumed one). A fresh run replaces the folder's TensorBoard events (its metrics.jsonl was truncated too) and logs
    the seed as round 0; a resumed one keeps them and hides those of rounds after its checkpoint (``purge_step``:
    a process killed after writing a round's events but before its checkpoint redoes that round), or, where the
    folder holds none, writes the earlier rounds first."""

    def __init__(self, run_dir: str | os.PathLike, rows: list[MetricsRow], *, rounds: int,
                 progress: bool | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.rounds = int(rounds)
        start = int(rows[-1]["round"]) if rows else 0
        self.fresh = start == 0
        self.tensorboard = None
        if tensorboard_available():
            folder = self.run_dir / TENSORBOARD_DIR
            if self.fresh and folder.exists():
                shutil.rmtree(folder)
            backfill = self.fresh or not has_events(folder)
            self.tensorboard = StepTensorboardLogger(folder, purge_step=None if backfill else start + 1)
            if backfill:
                for row in rows:
                    self._events(row)
        if rows:
            write_train_log(self.run_dir, rows)
        self.bar = None
        if progress if progress is not None else interactive_console():
            from tqdm import tqdm

            self.bar = tqdm(total=self.rounds, initial=min(start, self.rounds), desc="rounds", unit="round",
                            file=sys.stderr, dynamic_ncols=True, leave=True)
        if self.fresh and rows:
            self.announce(rows[0])

    def _events(self, row: MetricsRow) -> None:
        meta, train, valid, test = round_stats(row)
        self.tensorboard.log_stats(meta, train_stats=train, valid_stats=valid, test_stats=test)

    def write(self, rows: list[MetricsRow]) -> None:
        """The files after a round: ``rows`` are all the run's rows, the last one the new round."""
        write_train_log(self.run_dir, rows)
        if self.tensorboard is not None and rows:
            self._events(rows[-1])

    def announce(self, row: MetricsRow) -> None:
        """The round's console line (once) and the progress bar."""
        log.info("%s", round_line(row, self.rounds))
        if self.bar is not None and row["round"] > 0:
            self.bar.update(1)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> RoundLogs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
