"""`fedasr compare` on hand-made run folders: the table's values match the run files, plots are real PNGs,
energy/CO2 follow the selected profile, bad folders are named; round logs for federated runs."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch

from fedasr.cli import main
from fedasr.experiment import RunId, save_run_config
from fedasr.models.evaluate import hyps_tsv
from fedasr.report.compare import RunFolderError, compare_runs, load_run
from fedasr.report.energy import (
    ENERGY_ENV, ENERGY_FILE, PROFILES, UnknownProfileError, co2_kg, energy_kwh, measured_kwh, track_energy,
)
from fedasr.report.round_log import write_round_logs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# 10x5 float32 + 5 float64 travel (200 + 40 bytes); the integer buffer does not.
MODEL_BYTES = 240


def hyps_rows(errors_by_speaker: dict[str, tuple[int, int]]) -> list[dict]:
    rows = []
    for i, (spk, (errors, words)) in enumerate(errors_by_speaker.items()):
        rows.append({"ID": f"u{i}", "spk_id": spk, "gender": "female" if i % 2 else "male", "age": "twenties",
                     "accents": "", "errors": errors, "words": words, "ref": "a b c", "hyp": "a b"})
    return rows


def write_central_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"dev_wer": 0.30, "test_wer": 0.25, "epochs": 4, "seconds": 360.0}))
    (folder / "train_log.txt").write_text(
        "epoch: 1, lr: 5.00e-03 - train loss: 2.10 - valid loss: 1.90, valid CER: 20.00, valid WER: 50.00\n"
        "epoch: 2, lr: 5.00e-03 - train loss: 1.50 - valid loss: 1.40, valid CER: 12.00, valid WER: 30.00\n")
    (folder / "eval").mkdir()
    (folder / "eval" / "hyps.tsv").write_text(hyps_tsv(hyps_rows({"s1": (1, 10), "s2": (3, 10)})))
    save_run_config(folder, RunId("synth", "fr", "central", "tiny", 1), "lr: 0.005\n")
    return folder


def write_federated_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = [
        {"round": 0, "lr": 0.2, "clients": [], "dropped": [], "dev_wer": 0.60, "test_wer": 0.58},
        {"round": 1, "lr": 0.2, "sampled": 4, "clients": [0, 1, 2], "dropped": [[3, "not finite"]], "dev_wer": 0.50,
         "train_loss": 1.2, "train_fit_seconds_sum": 40.0, "seconds": {"round": 15.0, "evaluate": 3.0}},
        {"round": 2, "lr": 0.16, "sampled": 4, "clients": [0, 1, 2, 3], "dropped": [], "dev_wer": 0.40,
         "train_loss": 0.9, "train_fit_seconds_sum": 44.0, "seconds": {"round": 17.0, "evaluate": 3.0},
         "test_wer": 0.35},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "fl_config.json").write_text(json.dumps({
        "config": {"mode": "cross-silo", "rounds": 2, "local_epochs": 5, "clients_per_round": None,
                   "strategy": {"name": "wer-softmax", "temperature": 0.01}}, "num_clients": 4}))
    torch.save({"state_dict": {"w": torch.zeros(10, 5), "b": torch.zeros(5, dtype=torch.float64),
                               "n": torch.tensor(3)}, "round": 2, "dev_wer": 0.4}, folder / "final_model.pt")
    (folder / "eval").mkdir()
    (folder / "eval" / "hyps.tsv").write_text(hyps_tsv(hyps_rows({"s1": (2, 10), "s2": (5, 10)})))
    save_run_config(folder, RunId("synth", "fr", "cross-silo", "tiny", 1), {"rounds": 2})
    return folder


@pytest.fixture()
def runs(tmp_path) -> list[Path]:
    return [write_central_run(tmp_path / "central"), write_federated_run(tmp_path / "silo")]


def test_table_values_match_the_run_files(runs, tmp_path):
    summary = compare_runs(runs, tmp_path / "report", profile="v100", grid="france")
    central, silo = summary["rows"]
    assert central["setting"] == "central" and central["test_wer"] == 0.25 and central["dev_wer"] == 0.30
    assert central["bytes_sent"] == 0 and central["wer_vs_central"] == 1.0
    assert silo["setting"] == "cross-silo" and silo["clients"] == 4 and silo["clients_per_round"] == 4
    assert silo["rounds"] == 2 and silo["local_epochs"] == 5 and silo["strategy"] == "wer-softmax"
    assert silo["dev_wer"] == 0.40 and silo["test_wer"] == 0.35
    assert silo["wer_vs_central"] == pytest.approx(0.35 / 0.25)
    assert silo["bytes_sent"] == 8 * MODEL_BYTES  # 4 models sent in each of 2 rounds
    assert silo["bytes_received"] == 8 * MODEL_BYTES  # 3 + 1 dropped, then 4 replies
    assert silo["wall_seconds"] == 32.0 and silo["compute_seconds"] == 90.0
    assert silo["energy_kwh"] == pytest.approx(90.0 / 3600 * 250 * 1.67 / 1000)
    assert silo["co2_kg"] == pytest.approx(silo["energy_kwh"] * 0.079)
    with open(tmp_path / "report" / "compare.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["setting"] for r in table] == ["central", "cross-silo"]
    assert float(table[1]["test_wer"]) == 0.35 and int(table[1]["bytes_sent"]) == 8 * MODEL_BYTES
    markdown = (tmp_path / "report" / "compare.md").read_text()
    assert "| cross-silo | cross-silo | 4 | 4 | 2 | 5 | wer-softmax | 40.00 | 35.00 | [" in markdown
    # 95 % intervals from eval/hyps.tsv, resampling the 2 test speakers: central s1 1/10, s2 3/10 errors.
    assert central["test_wer_ci95"] == (0.1, 0.3) and central["wer_vs_central_ci95"] is None
    assert silo["test_wer_ci95"] == (0.2, 0.5) and 2.0 / 3.0 <= silo["wer_vs_central_ci95"][0] < silo["wer_vs_central_ci95"][1] <= 2.0


def test_a_federated_row_shows_the_dev_and_test_wer_of_one_model_the_best_dev_rounds(runs, tmp_path):
    silo = runs[1]
    with open(silo / "metrics.jsonl", "a") as handle:  # a third round, worse on dev: the model kept is round 2's
        handle.write(json.dumps({"round": 3, "lr": 0.16, "sampled": 4, "clients": [0, 1, 2, 3], "dropped": [],
                                 "dev_wer": 0.48, "test_wer": 0.41}) + "\n")
    (silo / "summary.json").write_text(json.dumps({"best_round": 2, "best_dev_wer": 0.40, "best_test_wer": 0.35,
                                                   "final_dev_wer": 0.48, "final_test_wer": 0.41}))
    row = compare_runs(runs, tmp_path / "report", profile="v100", grid="france")["rows"][1]
    assert (row["dev_wer"], row["test_wer"]) == (0.40, 0.35)


def test_bytes_counted_by_the_server_are_used_when_recorded(runs, tmp_path):
    silo = runs[1]
    rows = [json.loads(line) for line in (silo / "metrics.jsonl").read_text().splitlines()]
    for row, (sent, received) in zip(rows[1:], [(1000, 700), (1000, 1000)]):
        row.update(bytes_sent=sent, bytes_received=received)
    (silo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = compare_runs(runs, tmp_path / "report")["rows"][1]
    assert record["bytes_sent"] == 2000 and record["bytes_received"] == 1700


def test_plots_are_written_and_non_empty(runs, tmp_path):
    summary = compare_runs(runs, tmp_path / "report")
    names = sorted(Path(p).name for p in summary["plots"])
    assert names == ["dev_wer_per_round.png", "per_speaker_wer.png", "wer_per_group.png"]
    for path in summary["plots"]:
        data = Path(path).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_federated_run_curve_and_central_curve_from_logs(runs):
    central, silo = load_run(runs[0]), load_run(runs[1])
    assert silo.dev_curve == [(0, 0.60), (1, 0.50), (2, 0.40)]
    assert central.dev_curve == [(1, 0.50), (2, 0.30)]


def test_energy_profiles_use_the_reference_figures():
    assert energy_kwh(3600, PROFILES["v100"]) == pytest.approx(0.25 * 1.67)
    assert energy_kwh(3600, PROFILES["edge"]) == pytest.approx(0.0075)
    assert co2_kg(1.0, "china") == 0.975 and co2_kg(2.0, "uk") == pytest.approx(1.018)
    with pytest.raises(UnknownProfileError, match="choose one of"):
        co2_kg(1.0, "mars")


def test_bad_folders_are_named(tmp_path, runs):
    with pytest.raises(RunFolderError, match="neither result.json"):
        load_run(tmp_path)
    (runs[1] / "metrics.jsonl").write_text('{"round": 0, "dev_wer": 0.6}\n{broken\n')
    with pytest.raises(RunFolderError, match="metrics.jsonl, line 2"):
        load_run(runs[1])


def test_cli_compare_prints_the_table(runs, tmp_path, capsys):
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cli"), "--profile", "edge", "--grid", "us"]) == 0
    out = capsys.readouterr().out
    assert "| central |" in out and "compare.csv" in out
    assert main(["compare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "cli")]) == 2


def test_round_logs_from_metrics(runs):
    rows = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    written = write_round_logs(runs[1], rows)
    lines = (runs[1] / "train_log.txt").read_text().splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("round: 1, lr: 2.00e-01 - train loss: 1.20 - valid WER: 50.00")
    assert "test WER: 35.00" in lines[2]
    write_round_logs(runs[1], rows)  # regenerated, not appended
    assert len((runs[1] / "train_log.txt").read_text().splitlines()) == 3
    if written["tensorboard"] is not None:
        assert list(Path(written["tensorboard"]).glob("events.out.tfevents.*"))


def test_measured_energy_is_shown_beside_the_profile_estimate(runs, tmp_path):
    (runs[1] / "energy.json").write_text(json.dumps({"kwh": 0.002, "seconds": 30.0}))
    central, silo = compare_runs(runs, tmp_path / "report", grid="uk")["rows"]
    assert central["measured_kwh"] is None and central["measured_co2_kg"] is None  # not measured: no number
    assert silo["measured_kwh"] == 0.002 and silo["measured_co2_kg"] == pytest.approx(0.002 * 0.509)
    assert "| 0.002 | 0.00102 |" in (tmp_path / "report" / "compare.md").read_text()


def test_track_energy_writes_codecarbons_measurement(tmp_path, monkeypatch):
    """The real tracker (offline, no network) around a second of busy CPU: a positive energy in energy.json."""
    pytest.importorskip("codecarbon")
    monkeypatch.delenv(ENERGY_ENV, raising=False)
    with track_energy(tmp_path):
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:
            pass
    record = json.loads((tmp_path / ENERGY_FILE).read_text())
    assert record["kwh"] > 0 and record["seconds"] >= 1.0 and record["cpu_kwh"] > 0
    assert measured_kwh(tmp_path) == record["kwh"]
    monkeypatch.setenv(ENERGY_ENV, "0")  # switched off: the block runs, nothing is written
    with track_energy(tmp_path / "off"):
        pass
    assert not (tmp_path / "off").exists()


def test_a_resumed_run_adds_its_energy_to_the_earlier_parts(tmp_path):
    from fedasr.report.energy import add_earlier_parts

    part = {"kwh": 0.0006, "cpu_kwh": 0.0005, "gpu_kwh": 0.0, "ram_kwh": 0.0001, "seconds": 77.0, "parts": 1}
    path = tmp_path / ENERGY_FILE
    assert add_earlier_parts(part, path) == part  # nothing recorded before: the part alone
    path.write_text(json.dumps({"kwh": 0.0003, "cpu_kwh": 0.00025, "gpu_kwh": 0.0, "ram_kwh": 0.00005,
                                "seconds": 38.0, "parts": 1}))
    whole = add_earlier_parts(part, path)
    assert whole["kwh"] == pytest.approx(0.0009) and whole["seconds"] == 115.0 and whole["parts"] == 2
