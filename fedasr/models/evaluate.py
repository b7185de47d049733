"""``fedasr evaluate``: WER/CER of a checkpoint on a manifest, per utterance, per speaker and per group."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from fedasr.fl.run_folder import BEST_MODEL_FILE, RESOLVED_CONFIG_FILE, ModelFileError, load_model_file
from fedasr.metrics.wer import GROUP_COLUMNS, alignments_text, error_report, format_report
from fedasr.models.system import SpeechBrainASRSystem
from fedasr.utils.device import check_precision, resolve_device
from fedasr.utils.io import atomic_write_json, atomic_write_text, read_json

HYPS_COLUMNS = ("ID", "spk_id", "gender", "age", "accents", "errors", "words", "ref", "hyp")  # compare reads these
ALIGNMENTS_FILE = "wer.txt"  # per-utterance word alignments (SpeechBrain's wer.txt), beside hyps.tsv


def hyps_tsv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(HYPS_COLUMNS)
    for row in rows:
        writer.writerow([row.get(c, "") for c in HYPS_COLUMNS])
    return buffer.getvalue()


# What `fedasr evaluate` was given is not a checkpoint folder, a federated run folder or a model file of one.
ModelNotFoundError = ModelFileError


def locate_model(model: str | os.PathLike) -> tuple[Path, Path | None]:
    """(checkpoint folder, federated model file or None) for what ``fedasr evaluate`` accepts:

    - a seed checkpoint folder (``<output_folder>/seed_checkpoint`` of train-central): that model;
    - a federated run folder (``fedasr federate --output-dir``): its ``best_model.pt`` (the round chosen by dev WER),
      loaded into the seed checkpoint its ``fl_config.json`` names;
    - a model file of a federated run (``best_model.pt``, ``final_model.pt`` or a copy beside the run's
      ``fl_config.json``)."""
    path = Path(model)
    if path.is_file():
        run_folder, state_file = path.parent, path
    elif (path / RESOLVED_CONFIG_FILE).is_file():
        run_folder, state_file = path, path / BEST_MODEL_FILE
        if not state_file.is_file():
            raise ModelNotFoundError(f"{path}: a federated run folder without {BEST_MODEL_FILE} (the run has not "
                                     "finished a round): resume it, or evaluate its seed checkpoint")
    elif path.is_dir():
        return path, None
    else:
        raise ModelNotFoundError(f"{path}: not found (give a seed checkpoint folder, a federated run folder or its "
                                 f"{BEST_MODEL_FILE})")
    settings = run_folder / RESOLVED_CONFIG_FILE
    if not settings.is_file():
        raise ModelNotFoundError(f"{state_file}: a model file needs its run's {RESOLVED_CONFIG_FILE} beside it (it names "
                                 "the seed checkpoint the weights belong to)")
    seed = Path(read_json(settings).get("seed_checkpoint", ""))
    if not seed.is_dir():
        raise ModelNotFoundError(f"{settings}: its seed_checkpoint {str(seed)!r} is gone; the federated weights "
                                 "need the seed's tokenizer and hyperparameters: restore that folder")
    return seed, state_file


def evaluate_checkpoint(model: str | os.PathLike, manifest: str | os.PathLike, *, decoding: str = "beam",
                        out_dir: str | os.PathLike | None = None, max_utterances: int | None = None,
                        device: str = "auto", precision: str = "fp32") -> dict:
    """Decode ``manifest`` with a model; returns the report (overall + groups) and writes, in ``out_dir``:
    ``hyps.tsv`` (one line per utterance), ``wer_report.json`` and ``wer_report.txt`` (the printed table) and
    ``wer.txt`` (each utterance's word alignment with its errors marked, SpeechBrain's format).

    The report holds, overall and per value of each group column, the word errors split into ``insertions``,
    ``deletions`` and ``substitutions``: each summed over the utterances, like ``word_errors``.

    ``model``: a seed checkpoint folder, a federated run folder (its best model) or a model file of one (see
    :func:`locate_model`); ``device``: auto | cpu | cuda | cuda:N (an unusable one is refused before the
    checkpoint is read); ``precision``: decoding under autocast (fp32: none).

    >>> report = evaluate_checkpoint("runs/cross-silo", "manifests/test.csv", out_dir="runs/cross-silo/eval")  # doctest: +SKIP
    >>> round(100 * report["overall"]["wer"], 2)  # doctest: +SKIP
    """
    check_precision(precision, resolve_device(device))  # an unusable device: refused before anything is read
    checkpoint_dir, state_file = locate_model(model)
    system = SpeechBrainASRSystem.from_checkpoint(checkpoint_dir, device=device, precision=precision)
    if state_file is not None:
        system.load_state_dict(load_model_file(state_file))
    rows, loss = system.transcribe_manifest(manifest, decoding=decoding, max_utterances=max_utterances)
    report = error_report(rows, GROUP_COLUMNS)
    report.update(checkpoint=str(checkpoint_dir), weights=str(state_file or checkpoint_dir), manifest=str(manifest),
                  decoding=decoding, loss=loss, model=system.meta.get("model"), device=system.device,
                  precision=system.precision)
    report["table"] = format_report(report)
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / "hyps.tsv", hyps_tsv(rows))
        atomic_write_json(out_dir / "wer_report.json", report)
        atomic_write_text(out_dir / "wer_report.txt", report["table"] + "\n")
        atomic_write_text(out_dir / ALIGNMENTS_FILE, alignments_text(rows))
    return report
