"""`fedasr demo` end to end with the smallest settings: synth -> prepare -> partition -> warm-up -> centralized
-> cross-silo -> cross-device -> compare, on real espeak-ng audio, real SpeechBrain and a real Flower simulation.
A second call finds every stage done and skips it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedasr.utils.device import usable_cores

REPO = Path(__file__).resolve().parents[2]
# 12 speakers x 8 clips, 2 epochs, 2 rounds of 1 local epoch, greedy decoding everywhere, and the pure-CTC tiny
# model: an attention decoder that has trained 2 epochs babbles to its maximum length on every utterance, which
# made each federated stage take ~2.5 min here (measured), while CTC greedy decoding costs one forward pass.
MODEL = "ctc_tiny"
TINY = {
    "model": MODEL,
    "corpus.speakers": 12, "corpus.utterances_per_speaker": 8, "corpus.eval_speakers": 2,
    "corpus.eval_utterances_per_speaker": 6,
    "partition.warmup_speakers": 3, "partition.cross_silo_clients": 2,
    "warmup.number_of_epochs": 2, "warmup.dev_max_utterances": 8, "warmup.test_search": "greedy",
    "central.number_of_epochs": 2, "central.dev_max_utterances": 8, "central.test_search": "greedy",
    "cross_silo.set.rounds": 2, "cross_silo.set.local_epochs": 1, "cross_silo.set.evaluation.test_decoding": "greedy",
    "cross_silo.set.evaluation.server_wer_utterances": 4, "cross_silo.set.evaluation.dev_max_utterances": 8,
    "cross_device.set.rounds": 2, "cross_device.set.local_epochs": 1, "cross_device.set.clients_per_round": 2,
    "cross_device.set.evaluation.test_decoding": "greedy", "cross_device.set.evaluation.server_wer_utterances": 4,
    "cross_device.set.evaluation.dev_max_utterances": 8, "evaluation.decoding": "greedy",
}
SETTINGS = ("warmup", "central", "cross-silo", "cross-device")


def demo(out: Path) -> subprocess.CompletedProcess:
    args = [item for key, value in TINY.items() for item in ("--set", f"{key}={value}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "FEDASR_ENERGY": "1"}
    return subprocess.run([sys.executable, "-m", "fedasr.cli", "demo", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports(tmp_path: Path):
    out = tmp_path / "demo"
    done = demo(out)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    for number, stage in enumerate(("synth", "prepare", "partition", "warmup", "central", "cross-silo",
                                    "cross-device", "compare"), start=1):
        assert f"[{number}/8] {stage}: finished" in done.stdout
    for mode in ("cross-silo", "cross-device"):
        assert f"{mode} round 2/2: dev WER" in done.stdout  # per-round progress
    if usable_cores() >= 2:  # `central_beside_warmup: auto`: the centralized run trains in a child process
        assert "== central: running beside warmup" in done.stdout
        assert "[5/8] central: finished in" not in done.stdout.split("[6/8] cross-silo: running")[0]
        assert "central: 2 epochs, dev WER" in (out / "logs" / "central.log").read_text()
    assert f"Report and plots: {out.resolve() / 'report'}" in done.stdout

    runs = {s: out / "runs" / "synth" / "fr" / s / MODEL / "seed1234" for s in SETTINGS}
    for setting, run in runs.items():
        assert json.loads((run / "run.json").read_text())["setting"] == setting
        assert (run / "config.yaml").stat().st_size > 0
    with open(out / "report" / "compare.csv", newline="") as handle:
        table = {row["setting"]: row for row in csv.DictReader(handle)}
    assert set(table) == set(SETTINGS)
    for mode in ("cross-silo", "cross-device"):
        rows, summary = metrics_rows(runs[mode]), json.loads((runs[mode] / "summary.json").read_text())
        # The test WER reported is the model's chosen by dev WER (best_model.pt), as for the centralized run.
        assert float(table[mode]["test_wer"]) == pytest.approx(summary["best_test_wer"])
        assert summary["best_dev_wer"] == min(r["dev_wer"] for r in rows) == rows[summary["best_round"]]["dev_wer"]
        assert int(table[mode]["rounds"]) == 2 and int(table[mode]["bytes_sent"]) > 0
        assert (runs[mode] / "train_log.txt").read_text().count("round:") == 3
        assert (runs[mode] / "eval" / "hyps.tsv").exists()
        assert "test_wer" not in rows[0] and "test_wer" in rows[-1]  # the seed's is the warm-up stage's result
    assert int(table["cross-device"]["clients_per_round"]) == 2
    for setting in SETTINGS:  # speaker-bootstrap intervals around the WER of each run's own hypotheses
        low, high = map(float, table[setting]["test_wer_ci95"].split(";"))
        assert low <= float(table[setting]["test_wer"]) <= high
        assert (table[setting]["wer_vs_central_ci95"] == "") == (setting == "central")
    for setting in SETTINGS:  # codecarbon measured every training run; the table shows it beside the estimate
        measured = json.loads((runs[setting] / "energy.json").read_text())["kwh"]
        assert measured > 0 and float(table[setting]["measured_kwh"]) == pytest.approx(measured)
    assert float(table["central"]["test_wer"]) == pytest.approx(
        json.loads((runs["central"] / "result.json").read_text())["test_wer"])
    for name in ("dev_wer_per_round.png", "per_speaker_wer.png", "wer_per_group.png"):
        assert (out / "report" / name).stat().st_size > 5000

    again = demo(out)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 8
