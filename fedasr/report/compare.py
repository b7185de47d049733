"""``fedasr compare RUN_DIR...``: one table (Markdown + CSV) and plots from finished run folders alone.

A run folder is either a centralized run (``result.json`` from ``fedasr train-central``) or a federated run
(``metrics.jsonl`` + ``fl_config.json`` from ``fedasr federate``). Optional, when present: ``run.json`` (its
identity, fedasr.experiment) and ``eval/hyps.tsv`` (per-utterance test hypotheses with speaker and demographic
fields, as ``fedasr evaluate`` writes them) for the per-speaker and per-group plots.

Communication comes from the run's records: the bytes of the arrays the server sent and received each round
(``bytes_sent`` / ``bytes_received`` in metrics.jsonl); for runs recorded before those fields, the floating-point
size of the saved model x messages (models sent to sampled clients; replies received).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedasr.experiment import read_run_id
from fedasr.fl.metrics_log import METRICS_FILE, MetricsFileError, MetricsRow, read_metrics_rows
from fedasr.fl.run_folder import BEST_MODEL_FILE, FINAL_MODEL_FILE, RESOLVED_CONFIG_FILE, load_model_file
from fedasr.report.energy import co2_kg, device_profile, energy_kwh, grid_intensity, measured_kwh
from fedasr.utils.io import atomic_open, atomic_write_json, atomic_write_text, read_json

HYPS_FILE = Path("eval") / "hyps.tsv"
TABLE_COLUMNS = ("run", "setting", "clients", "clients_per_round", "rounds", "local_epochs", "strategy",
                 "dev_wer", "test_wer", "test_wer_ci95", "wer_vs_central", "wer_vs_central_ci95", "bytes_sent", "bytes_received", "wall_seconds",
                 "compute_seconds", "energy_kwh", "co2_kg", "measured_kwh", "measured_co2_kg")
PLOTS = {"curves": "dev_wer_per_round.png", "speakers": "per_speaker_wer.png", "groups": "wer_per_group.png"}
DEMOGRAPHIC_COLUMNS = ("gender", "age", "accents")


class RunFolderError(ValueError):
    """A folder that is not a finished run; the message names the folder and what is missing."""


@dataclass
class RunRecord:
    """What the table and the plots need from one run folder."""

    path: str
    name: str
    setting: str
    clients: int
    clients_per_round: int
    rounds: int | None
    local_epochs: int | None
    strategy: str
    dev_wer: float
    test_wer: float | None
    bytes_sent: int = 0
    bytes_received: int = 0
    wall_seconds: float = 0.0
    compute_seconds: float = 0.0
    measured_kwh: float | None = None  # codecarbon's measurement of the run (energy.json), when there is one
    dev_curve: list[tuple[int, float]] = field(default_factory=list)


# ---- reading run folders -----------------------------------------------------------------------------------------

def load_run(folder: str | os.PathLike) -> RunRecord:
    """Read one run folder (centralized or federated)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"{folder}: not a folder. Pass run folders (the output folder of a stage).")
    if (folder / METRICS_FILE).exists():
        return load_federated_run(folder)
    if (folder / "result.json").exists():
        return load_central_run(folder)
    raise RunFolderError(f"{folder}: neither result.json (train-central) nor metrics.jsonl (federate) found: "
                         "is the run finished, and is this its output folder?")


def _run_name(folder: Path, setting: str) -> str:
    run_id = read_run_id(folder)
    return run_id.setting if run_id else f"{setting} ({folder.name})"


def load_central_run(folder: Path) -> RunRecord:
    result = read_json(folder / "result.json")
    run_id = read_run_id(folder)
    setting = run_id.setting if run_id else "central"
    epochs = int(result.get("epochs") or 0) or None
    curve = _central_dev_curve(folder / "train_log.txt")
    return RunRecord(
        path=str(folder), name=_run_name(folder, setting), setting=setting, clients=1, clients_per_round=1,
        rounds=None, local_epochs=epochs, strategy="centralized", dev_wer=float(result["dev_wer"]),
        test_wer=_float_or_none(result.get("test_wer")), wall_seconds=float(result.get("seconds") or 0.0),
        compute_seconds=float(result.get("seconds") or 0.0), measured_kwh=measured_kwh(folder), dev_curve=curve,
    )


def _central_dev_curve(train_log: Path) -> list[tuple[int, float]]:
    """(epoch, dev WER as a fraction) from SpeechBrain's train_log.txt lines ``epoch: N, ... valid WER: X``."""
    if not train_log.exists():
        return []
    curve = []
    for line in train_log.read_text(encoding="utf-8").splitlines():
        fields = dict(part.strip().split(": ", 1) for part in line.split(",") if ": " in part)
        if "epoch" in fields and "valid WER" in fields:
            curve.append((int(float(fields["epoch"])), float(fields["valid WER"]) / 100))
    return curve


def read_run_rows(path: Path) -> list[MetricsRow]:
    """The rows of a run's metrics.jsonl; a damaged or empty file is a RunFolderError naming it."""
    try:
        rows = read_metrics_rows(path)
    except MetricsFileError as err:
        raise RunFolderError(str(err)) from None
    if not rows:
        raise RunFolderError(f"{path}: no rounds recorded yet (not even the seed evaluation)")
    return rows


def load_federated_run(folder: Path) -> RunRecord:
    rows = read_run_rows(folder / METRICS_FILE)
    resolved_path = folder / RESOLVED_CONFIG_FILE
    if not resolved_path.exists():
        raise RunFolderError(f"{resolved_path}: missing (written by `fedasr federate` at start); the folder is "
                             "not a complete federated run")
    resolved = read_json(resolved_path)
    config = resolved["config"]
    run_id = read_run_id(folder)
    setting = run_id.setting if run_id else config["mode"]
    num_clients = int(resolved["num_clients"])
    rounds = [r for r in rows if r["round"] > 0]
    if all("bytes_sent" in r for r in rounds):  # counted by the server from the arrays it sent and received
        bytes_sent = sum(int(r["bytes_sent"]) for r in rounds)
        bytes_received = sum(int(r["bytes_received"]) for r in rounds)
    else:  # runs recorded before the server counted bytes: model size x messages
        model_bytes = travelling_model_bytes(folder)
        bytes_sent = model_bytes * sum(int(r.get("sampled", len(r.get("clients", [])))) for r in rounds)
        bytes_received = model_bytes * sum(len(r.get("clients", [])) + len(r.get("dropped", [])) for r in rounds)
    dev_wer, test_wer = chosen_model_wers(folder, rows)
    return RunRecord(
        path=str(folder), name=_run_name(folder, setting), setting=setting, clients=num_clients,
        clients_per_round=int(config.get("clients_per_round") or num_clients), rounds=len(rounds),
        local_epochs=int(config["local_epochs"]), strategy=str(config["strategy"]["name"]),
        dev_wer=dev_wer, test_wer=test_wer,
        bytes_sent=bytes_sent, bytes_received=bytes_received,
        wall_seconds=sum(float(r.get("seconds", {}).get("round", 0.0)) for r in rounds),
        compute_seconds=sum(float(r.get("train_fit_seconds_sum", 0.0)) + float(r.get("seconds", {}).get("evaluate", 0.0))
                            for r in rounds),
        measured_kwh=measured_kwh(folder),
        dev_curve=[(int(r["round"]), float(r["dev_wer"])) for r in rows],
    )


def chosen_model_wers(folder: Path, rows: list[MetricsRow]) -> tuple[float, float | None]:
    """Dev and test WER of the model chosen by dev WER (summary.json's best round, as a centralized run reports its
    best epoch's); runs recorded before it: the last round's dev WER and the last tested round's test WER."""
    summary_path = folder / "summary.json"
    summary = read_json(summary_path) if summary_path.exists() else {}
    if summary.get("best_test_wer") is not None:
        return float(summary["best_dev_wer"]), float(summary["best_test_wer"])
    tested = [r for r in rows if r.get("test_wer") is not None]
    return float(rows[-1]["dev_wer"]), float(tested[-1]["test_wer"]) if tested else None


def travelling_model_bytes(folder: Path) -> int:
    """Bytes of one model message: the floating-point tensors of the run's saved global model."""
    import torch

    for name in (FINAL_MODEL_FILE, BEST_MODEL_FILE):
        path = folder / name
        if path.exists():
            state = load_model_file(path)
            return sum(t.numel() * t.element_size() for t in state.values() if torch.is_floating_point(t))
    raise RunFolderError(f"{folder}: no {FINAL_MODEL_FILE} or {BEST_MODEL_FILE} to measure the model size from")


def _float_or_none(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


# ---- the table ---------------------------------------------------------------------------------------------------

def table_rows(runs: list[RunRecord], *, profile: str = "v100", grid: str = "france",
               intervals: dict[str, dict] | None = None) -> list[dict]:
    """One dict per run with every column of :data:`TABLE_COLUMNS` (WERs as fractions); ``intervals``: the
    speaker-bootstrap intervals of :func:`test_wer_intervals` by run path (None: no interval columns filled)."""
    device = device_profile(profile)
    grid_intensity(grid)  # fail early on an unknown grid
    central = next((r for r in runs if r.setting == "central"), None)
    intervals = intervals or {}
    rows = []
    for run in runs:
        interval = intervals.get(run.path) or {}
        kwh = energy_kwh(run.compute_seconds, device)
        relative = None
        if central is not None and run.test_wer is not None and central.test_wer:
            relative = run.test_wer / central.test_wer
        rows.append({
            "run": run.name, "setting": run.setting, "clients": run.clients,
            "clients_per_round": run.clients_per_round, "rounds": run.rounds, "local_epochs": run.local_epochs,
            "strategy": run.strategy, "dev_wer": run.dev_wer, "test_wer": run.test_wer,
            "test_wer_ci95": interval.get("wer"), "wer_vs_central": relative,
            "wer_vs_central_ci95": interval.get("ratio"),
            "bytes_sent": run.bytes_sent, "bytes_received": run.bytes_received,
            "wall_seconds": round(run.wall_seconds, 1), "compute_seconds": round(run.compute_seconds, 1),
            "energy_kwh": kwh, "co2_kg": co2_kg(kwh, grid), "measured_kwh": run.measured_kwh,
            "measured_co2_kg": None if run.measured_kwh is None else co2_kg(run.measured_kwh, grid),
        })
    return rows


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column in ("dev_wer", "test_wer"):
        return f"{100 * value:.2f}"
    if column == "wer_vs_central":
        return f"{value:.3f}"
    if column == "test_wer_ci95":
        return f"[{100 * value[0]:.2f}, {100 * value[1]:.2f}]"
    if column == "wer_vs_central_ci95":
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    if column.startswith("bytes"):
        return f"{value / 1e6:.2f}"
    if column in ("energy_kwh", "co2_kg", "measured_kwh", "measured_co2_kg"):
        return f"{value:.3g}"
    return str(value)


MARKDOWN_HEADERS = {"dev_wer": "dev WER %", "test_wer": "test WER %", "wer_vs_central": "WER / central",
                    "test_wer_ci95": "test WER 95 % CI", "wer_vs_central_ci95": "WER / central 95 % CI",
                    "bytes_sent": "MB sent", "bytes_received": "MB received", "wall_seconds": "wall s",
                    "compute_seconds": "compute s", "energy_kwh": "kWh (profile)", "co2_kg": "kg CO2 (profile)",
                    "measured_kwh": "kWh (measured)", "measured_co2_kg": "kg CO2 (measured)",
                    "clients_per_round": "clients/round"}


def markdown_table(rows: list[dict]) -> str:
    headers = [MARKDOWN_HEADERS.get(c, c.replace("_", " ")) for c in TABLE_COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row[c]) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def csv_table(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else ";".join(map(str, row[k])) if isinstance(row[k], tuple) else row[k]
                         for k in TABLE_COLUMNS})
    return buffer.getvalue()


# ---- plots -------------------------------------------------------------------------------------------------------

def read_hyps(folder: str | os.PathLike) -> list[dict]:
    """Per-utterance rows of ``<run>/eval/hyps.tsv`` (empty when the run was not evaluated per utterance)."""
    path = Path(folder) / HYPS_FILE
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def _new_figure(width=7.0, height=4.5, ncols=1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=ncols == 1)
    return plt, fig, axes


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return path


def plot_dev_curves(runs: list[RunRecord], path: Path) -> Path:
    """Global dev WER per round of every federated run; the centralized result as a horizontal line."""
    plt, fig, ax = _new_figure()
    for run in runs:
        if run.rounds is not None and run.dev_curve:
            ax.plot([r for r, _ in run.dev_curve], [100 * w for _, w in run.dev_curve], marker="o", label=run.name)
        elif run.setting == "central":
            ax.axhline(100 * run.dev_wer, linestyle="--", color="black", label=f"{run.name} (best dev)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = seed model)")
    ax.set_ylabel("dev WER (%)")
    ax.set_title("Global model dev WER per round")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_speaker_wers(runs: list[RunRecord], hyps: dict[str, list[dict]], path: Path) -> Path:
    """Per-speaker test WER distribution (sum of errors / sum of words per speaker), one box per run."""
    from fedasr.metrics.wer import counts_by

    labels, data = [], []
    for run in runs:
        rows = hyps.get(run.path) or []
        if rows:
            labels.append(run.name)
            data.append([100 * c.wer for c in counts_by(rows, "spk_id").values()])
    plt, fig, ax = _new_figure()
    if data:
        ax.boxplot(data)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        for i, values in enumerate(data, start=1):
            ax.scatter([i] * len(values), values, s=12, alpha=0.6)
    else:
        ax.text(0.5, 0.5, "no per-utterance hypotheses (eval/hyps.tsv) in these runs", ha="center", va="center")
    ax.set_ylabel("test WER per speaker (%)")
    ax.set_title("Per-speaker WER distribution")
    return _save(plt, fig, path)


def plot_group_wers(runs: list[RunRecord], hyps: dict[str, list[dict]], path: Path) -> Path | None:
    """Test WER per demographic group (gender, age, accents: those the corpus fills), grouped bars per run."""
    from fedasr.metrics.wer import counts_by

    columns = [c for c in DEMOGRAPHIC_COLUMNS
               if any((row.get(c) or "") for rows in hyps.values() for row in rows)]
    if not columns:
        return None
    plt, fig, axes = _new_figure(width=5.0 * len(columns), ncols=len(columns))
    axes = axes if len(columns) > 1 else [[axes]]
    with_hyps = [r for r in runs if hyps.get(r.path)]
    for ax, column in zip(axes[0], columns):
        groups = sorted({str(row.get(column) or "unknown") for r in with_hyps for row in hyps[r.path]})
        width = 0.8 / max(len(with_hyps), 1)
        for i, run in enumerate(with_hyps):
            counts = counts_by(hyps[run.path], column)
            ax.bar([g + i * width for g in range(len(groups))],
                   [100 * counts[name].wer if name in counts else 0.0 for name in groups], width, label=run.name)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=30, ha="right")
        ax.set_title(f"test WER by {column}")
        ax.set_ylabel("WER (%)")
    axes[0][0].legend()
    return _save(plt, fig, path)


BOOTSTRAP_RESAMPLES = 2000


def test_wer_intervals(runs: list[RunRecord], hyps: dict[str, list[dict]]) -> dict[str, dict]:
    """95 % intervals of test WER and of WER / central for the runs with per-utterance hypotheses (eval/hyps.tsv),
    by a paired bootstrap over test speakers; runs on another test set than the centralized run get none."""
    from fedasr.metrics.wer import speaker_bootstrap

    with_rows = {run.path: hyps[run.path] for run in runs if hyps.get(run.path)}
    central = next((r.path for r in runs if r.setting == "central" and r.path in with_rows), None)
    if central is not None:
        test_set = {row["ID"] for row in with_rows[central]}
        with_rows = {path: rows for path, rows in with_rows.items() if {row["ID"] for row in rows} == test_set}
    return speaker_bootstrap(with_rows, central, resamples=BOOTSTRAP_RESAMPLES)


# ---- the command -------------------------------------------------------------------------------------------------

def compare_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, *, profile: str = "v100",
                 grid: str = "france") -> dict:
    """Write ``compare.md``, ``compare.csv``, ``compare.json`` and the plots to ``out_dir``; returns a summary.

    ``run_dirs``: output folders of train-central (the centralized baseline, the warm-up) and federate runs.

    >>> compare_runs(["out/runs/central", "out/runs/cross-silo"], "out/report", grid="france")  # doctest: +SKIP
    """
    if not run_dirs:
        raise RunFolderError("no run folders given: pass the output folders of train-central / federate runs")
    runs = [load_run(d) for d in run_dirs]
    hyps = {run.path: read_hyps(run.path) for run in runs}
    rows = table_rows(runs, profile=profile, grid=grid, intervals=test_wer_intervals(runs, hyps))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    profile_line = (f"Energy: compute seconds x {device_profile(profile).description}; CO2: grid '{grid}' "
                    f"({grid_intensity(grid)} kg CO2/kWh). WER/central: test WER over the centralized run's. "
                    f"95 % CI: percentile bootstrap over test speakers ({BOOTSTRAP_RESAMPLES} resamples, paired for "
                    "the ratio) of each run's eval/hyps.tsv.")
    markdown = markdown_table(rows) + "\n\n" + profile_line + "\n"
    atomic_write_text(out / "compare.md", markdown)
    atomic_write_text(out / "compare.csv", csv_table(rows))
    plots = [plot_dev_curves(runs, out / PLOTS["curves"]), plot_speaker_wers(runs, hyps, out / PLOTS["speakers"]),
             plot_group_wers(runs, hyps, out / PLOTS["groups"])]
    summary = {"rows": rows, "runs": [asdict(r) for r in runs], "profile": profile, "grid": grid,
               "plots": [str(p) for p in plots if p is not None],
               "plot_names": [p.name for p in plots if p is not None], "table": markdown, "out_dir": str(out)}
    atomic_write_json(out / "compare.json", {k: v for k, v in summary.items() if k != "table"})
    return summary
