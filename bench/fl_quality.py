"""Quality study: centralized vs federated test WER over several seeds, for one or more settings.

For each setting and seed it runs the staged pipeline (fedasr.pipeline: warm-up, central, cross-silo, cross-device)
on ONE corpus (synthesized once, or a Common Voice folder given with --corpus), so every run is scored on the same
test set; the seed changes model initialisation, batch order and client sampling, not the data. A setting is a
name and pipeline overrides; the settings of one seed share its warm-up and central runs (copied, not retrained)
when a setting trains them from the same settings and files: a partition setting that leaves the warm-up speakers
as they were (e.g. `partition.skew=accent`) keeps both, and their stages only re-test them (their stage seconds are
then the re-test's; the first setting's are the training's).

Prints and writes (OUT/fl_quality.{json,md}, OUT/fl_quality_curves.png) per setting: mean and spread (min-max) of
test WER at the round chosen by dev WER (best_model.pt) and at the last round, the FL/central ratios, rounds until
the dev WER is within 10 % of the central dev WER, and compute seconds per stage.

    .venv/bin/python bench/fl_quality.py --seeds 1234 1235 1236 --out results/fl_quality
    .venv/bin/python bench/fl_quality.py --seeds 1234 1235 1236 --out results/fl_quality_paper \\
        --setting "default:" --setting "paper:cross_silo.hparams=hparams/fl/paper.yaml cross_device.hparams=hparams/fl/paper.yaml"
    # a harder corpus: more speakers with noise, speed and reverberation (`fedasr synth --help`: corpus.* are its
    # options), in accent-dominated silos of unequal sizes (`fedasr partition --help`: partition.skew,
    # partition.silo_sizes, ...)
    .venv/bin/python bench/fl_quality.py --seeds 1 2 3 --set corpus.speakers=120 --set corpus.acoustics=hard \\
        --set partition.skew=accent --set partition.silo_sizes=skewed
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedasr.pipeline import (  # noqa: E402
    DEFAULT_CONFIG, Layout, build_pipeline, central_starts_from_warmup, load_pipeline_config, parse_set_overrides,
    run_pipeline, trained_from_current_inputs,
)
from fedasr.fl.metrics_log import METRICS_FILE, read_metrics_rows  # noqa: E402
from fedasr.utils.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from fedasr.utils.settings import deep_merge  # noqa: E402

FL_SETTINGS = ("cross-silo", "cross-device")


def parse_setting(text: str) -> tuple[str, dict]:
    """``"name: a.b=1 c=x"`` -> (name, nested overrides)."""
    name, _, pairs = text.partition(":")
    if not name.strip():
        raise SystemExit(f"--setting {text!r}: give a name first, e.g. --setting 'lr1:cross_silo.set.lr=1.0'")
    return name.strip(), parse_set_overrides(pairs.split())


def shared_stages_copy(source: Path, source_config: dict, target: Path, config: dict, corpus: Path) -> list[str]:
    """Copy a finished pipeline folder for another setting of the same seed: without its federated runs and report
    (they are redone with the new settings), and without the warm-up or centralized run when the new setting changes
    its own settings (or, for a centralized run started from the warm-up, the warm-up's). Returns the training runs
    kept: :func:`drop_runs_trained_on_other_data` checks their inputs once the new setting's data stages ran."""
    def own_settings(folder: Path, cfg: dict) -> dict:
        pipeline = build_pipeline(folder, cfg, corpus=corpus, echo=lambda line: None)
        return {stage.name: json.dumps(stage.settings, sort_keys=True, default=str) for stage in pipeline.stages}

    before, after = own_settings(source, source_config), own_settings(target, config)
    kept = {"warmup": before["warmup"] == after["warmup"]}
    kept["central"] = (before["central"] == after["central"]
                       and (not central_starts_from_warmup(config) or kept["warmup"]))
    layout = Layout(source, source_config)
    skipped = ({layout.run(s).resolve() for s in FL_SETTINGS} | {layout.report.resolve()}
               | {layout.run(s).resolve() for s, keep in kept.items() if not keep})

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if (Path(folder) / n).resolve() in skipped]

    shutil.copytree(source, target, ignore=ignore, symlinks=True)
    return [s for s, keep in kept.items() if keep]


def drop_runs_trained_on_other_data(folder: Path, config: dict, kept: list[str]) -> list[str]:
    """Delete each copied warm-up / centralized run that the setting's own manifests would train otherwise (e.g. a
    partition setting that picks other warm-up speakers), so the pipeline trains it afresh; a run trained from the
    same files is kept, and its stage only re-tests it. Returns the runs deleted."""
    layout = Layout(folder, config)
    dropped = []
    for setting in ("warmup", "central"):  # the warm-up first: a central run may start from it
        starts_from_dropped = setting == "central" and "warmup" in dropped and central_starts_from_warmup(config)
        if setting in kept and (starts_from_dropped or not trained_from_current_inputs(layout, setting)):
            shutil.rmtree(layout.run(setting))
            dropped.append(setting)
    return dropped


def run_summary(out: Path, config: dict) -> dict:
    """Test WERs, ratios, curves and seconds of one pipeline folder."""
    layout = Layout(out, config)
    central = read_json(layout.run("central") / "result.json")
    warmup = read_json(layout.run("warmup") / "result.json")
    stages = read_json(out / "stages.json") if (out / "stages.json").exists() else {}
    result = {"central_test_wer": central["test_wer"], "central_dev_wer": central["dev_wer"],
              "seed_test_wer": warmup["test_wer"], "stage_seconds": stages}
    for setting in FL_SETTINGS:
        folder = layout.run(setting)
        summary = read_json(folder / "summary.json")
        rows = read_metrics_rows(folder / METRICS_FILE)
        curve = [float(r["dev_wer"]) for r in rows]
        within = [r for r, wer in enumerate(curve) if wer <= 1.1 * central["dev_wer"]]
        result[setting] = {
            "best_test_wer": summary.get("best_test_wer"), "last_test_wer": summary.get("final_test_wer"),
            "best_round": summary["best_round"], "dev_curve": curve,
            "best_ratio": summary["best_test_wer"] / central["test_wer"],
            "last_ratio": summary["final_test_wer"] / central["test_wer"],
            "rounds_to_within_10pct_of_central_dev": within[0] if within else None,
        }
    return result


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "min": None, "max": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def aggregate(per_seed: dict[int, dict]) -> dict:
    runs = list(per_seed.values())
    table = {"central_test_wer": spread([r["central_test_wer"] for r in runs]),
             "seed_test_wer": spread([r["seed_test_wer"] for r in runs])}
    for setting in FL_SETTINGS:
        for key in ("best_test_wer", "last_test_wer", "best_ratio", "last_ratio", "rounds_to_within_10pct_of_central_dev"):
            table[f"{setting} {key}"] = spread([r[setting][key] for r in runs])
    stage_names = sorted({name for r in runs for name in r["stage_seconds"]})
    table["stage_seconds"] = {name: spread([r["stage_seconds"].get(name) for r in runs]) for name in stage_names}
    return table


def cell(stats: dict, percent: bool = False) -> str:
    if stats["mean"] is None:
        return "-"
    scale, fmt = (100, "{:.2f}") if percent else (1, "{:.3f}")
    return (f"{fmt.format(scale * stats['mean'])} [{fmt.format(scale * stats['min'])}, "
            f"{fmt.format(scale * stats['max'])}]")


def markdown(results: dict, seeds: list[int]) -> str:
    lines = [f"Mean [min, max] over seeds {seeds}; test WER in %, of the model chosen by dev WER ('best') and of the "
             "last round ('last'); ratio = federated / central test WER of the same seed.", "",
             "| setting | central | warm-up seed | cross-silo best | cross-silo last | silo ratio (best) | "
             "cross-device best | cross-device last | device ratio (best) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        t = entry["aggregate"]
        lines.append(
            f"| {name} | {cell(t['central_test_wer'], True)} | {cell(t['seed_test_wer'], True)} | "
            f"{cell(t['cross-silo best_test_wer'], True)} | {cell(t['cross-silo last_test_wer'], True)} | "
            f"{cell(t['cross-silo best_ratio'])} | {cell(t['cross-device best_test_wer'], True)} | "
            f"{cell(t['cross-device last_test_wer'], True)} | {cell(t['cross-device best_ratio'])} |")
    lines += ["", "Per seed (test WER %, best-dev round in brackets): a seed whose centralized run barely trained (a WER far "
              "above the others') makes its ratios meaningless, and the means with it.", "",
              "| setting | seed | central | warm-up seed | cross-silo best / last | ratio | cross-device best / last | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        for seed, r in entry["per_seed"].items():
            silo, device = r["cross-silo"], r["cross-device"]
            lines.append(
                f"| {name} | {seed} | {100 * r['central_test_wer']:.2f} | {100 * r['seed_test_wer']:.2f} | "
                f"{100 * silo['best_test_wer']:.2f} ({silo['best_round']}) / {100 * silo['last_test_wer']:.2f} | "
                f"{silo['best_ratio']:.3f} | {100 * device['best_test_wer']:.2f} ({device['best_round']}) / "
                f"{100 * device['last_test_wer']:.2f} | {device['best_ratio']:.3f} |")
    lines += ["", "| setting | stage | seconds mean [min, max] |", "|---|---|---|"]
    for name, entry in results.items():
        for stage, stats in entry["aggregate"]["stage_seconds"].items():
            lines.append(f"| {name} | {stage} | {stats['mean']:.0f} [{stats['min']:.0f}, {stats['max']:.0f}] |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, setting in zip(axes[0], FL_SETTINGS):
        for name, entry in results.items():
            curves = [r[setting]["dev_curve"] for r in entry["per_seed"].values()]
            length = min(len(c) for c in curves)
            mean = [100 * statistics.fmean(c[i] for c in curves) for i in range(length)]
            line, = ax.plot(range(length), mean, marker="o", label=f"{name} (mean of {len(curves)})")
            for c in curves:
                ax.plot(range(len(c)), [100 * w for w in c], color=line.get_color(), alpha=0.25)
            central = statistics.fmean(r["central_dev_wer"] for r in entry["per_seed"].values())
            ax.axhline(100 * central, linestyle="--", color=line.get_color(), alpha=0.6)
        ax.set_title(f"{setting}: global dev WER per round (dashed: central)")
        ax.set_xlabel("round (0 = warm-up seed)")
        ax.set_ylabel("dev WER (%)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    parser.add_argument("--out", default="results/fl_quality")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="pipeline YAML (default: the demo's)")
    parser.add_argument("--corpus", default=None, help="a Common Voice folder (default: synthesize the config's corpus once)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every setting")
    parser.add_argument("--setting", action="append", default=[], metavar="'NAME: KEY=VALUE ...'",
                        help="a named setting (repeatable); default: one setting 'default' with no overrides")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    common = parse_set_overrides(args.set)
    settings = [parse_setting(s) for s in args.setting] or [("default", {})]
    corpus = Path(args.corpus).resolve() if args.corpus else out / "corpus"
    if args.corpus is None and not (corpus / "train.tsv").exists():  # one corpus: the same test set for every run
        run_pipeline(out / "corpus_pipeline", config_file=args.config, overrides=common, stop="synth")
        shutil.copytree(out / "corpus_pipeline" / "corpus", corpus, dirs_exist_ok=True)
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for seed in args.seeds:
        first, first_config = None, None
        for name, overrides in settings:
            merged = deep_merge(deep_merge(common, {"seed": seed}), overrides)
            config = load_pipeline_config(args.config, merged)
            folder = out / name / f"seed{seed}"
            print(f"== {name}, seed {seed} -> {folder}", flush=True)
            if first is not None and not folder.exists():
                kept = shared_stages_copy(first, first_config, folder, config, corpus)
                run_pipeline(folder, config_file=args.config, overrides=merged, corpus=corpus, stop="partition",
                             echo=lambda line: None)
                dropped = drop_runs_trained_on_other_data(folder, config, kept)
                print(f"   from {first.parent.name}: kept {sorted(set(kept) - set(dropped)) or 'no'} training runs, "
                      f"retraining {sorted({'warmup', 'central'} - set(kept) | set(dropped)) or 'none'}", flush=True)
            run_pipeline(folder, config_file=args.config, overrides=merged, corpus=corpus, stop="cross-device",
                         echo=lambda line: print(f"   {line}", flush=True))
            results.setdefault(name, {"overrides": overrides, "per_seed": {}})["per_seed"][seed] = run_summary(folder, config)
            if first is None:
                first, first_config = folder, config
    for entry in results.values():
        entry["aggregate"] = aggregate(entry["per_seed"])
    table = markdown(results, args.seeds)
    atomic_write_json(out / "fl_quality.json", {"seeds": args.seeds, "common_overrides": common, "results": results,
                                                "seconds": round(time.perf_counter() - started, 1)})
    atomic_write_text(out / "fl_quality.md", table)
    plot_curves(results, out / "fl_quality_curves.png")
    print(table)
    print(f"written: {out / 'fl_quality.md'}, fl_quality.json, fl_quality_curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
