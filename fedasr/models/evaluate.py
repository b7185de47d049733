"""``fedasr evaluate``: WER/CER of a checkpoint on a manifest, per utterance, per speaker and per group."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from fedasr.metrics.wer import GROUP_COLUMNS, error_report, format_report
from fedasr.models.system import SpeechBrainASRSystem
from fedasr.utils.io import atomic_write_json, atomic_write_text

HYPS_COLUMNS = ("ID", "spk_id", "gender", "age", "accents", "errors", "words", "ref", "hyp")


def hyps_tsv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(HYPS_COLUMNS)
    for row in rows:
        writer.writerow([row.get(c, "") for c in HYPS_COLUMNS])
    return buffer.getvalue()


def evaluate_checkpoint(checkpoint_dir: str | os.PathLike, manifest: str | os.PathLike, *, decoding: str = "beam",
                        out_dir: str | os.PathLike | None = None, max_utterances: int | None = None,
                        device: str = "auto", precision: str = "fp32") -> dict:
    """Decode ``manifest`` with the checkpoint; returns the report (overall + groups) and writes, in ``out_dir``:
    ``hyps.tsv`` (one line per utterance), ``wer_report.json`` and ``wer_report.txt`` (the printed table).

    ``device``: auto | cpu | cuda | cuda:N (an unusable one is refused before the checkpoint is read);
    ``precision``: decoding under autocast (fp32: none)."""
    system = SpeechBrainASRSystem.from_checkpoint(checkpoint_dir, device=device, precision=precision)
    rows, loss = system.transcribe_manifest(manifest, decoding=decoding, max_utterances=max_utterances)
    report = error_report(rows, GROUP_COLUMNS)
    report.update(checkpoint=str(checkpoint_dir), manifest=str(manifest), decoding=decoding, loss=loss,
                  model=system.meta.get("model"), device=system.device, precision=system.precision)
    report["table"] = format_report(report)
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / "hyps.tsv", hyps_tsv(rows))
        atomic_write_json(out_dir / "wer_report.json", report)
        atomic_write_text(out_dir / "wer_report.txt", report["table"] + "\n")
    return report
