"""`fedasr` command line: parses arguments and calls the library. No logic lives here.

Each subcommand is one ``_add_<name>(subparsers)`` function that registers its options and a ``run`` callable;
library modules are imported inside ``run`` so ``fedasr --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="synthesize a small Common-Voice-shaped corpus with espeak-ng voices")
    p.add_argument("out_dir", help="folder to write the corpus to (Common Voice layout: clips/, *.tsv)")
    p.add_argument("--lang", default="fr", help="sentence language: fr (default) or en")
    p.add_argument("--speakers", type=int, default=None,
                   help="number of speakers (default: 40; the demo's corpus: 58 with --eval-speakers 15 "
                   "--eval-utterances-per-speaker 8)")
    p.add_argument("--utterances-per-speaker", type=int, default=None, help="clips per speaker")
    p.add_argument("--eval-speakers", type=int, default=None,
                   help="speakers in dev and in test each (default: about 15 %% of --speakers each)")
    p.add_argument("--eval-utterances-per-speaker", type=int, default=None,
                   help="clips per dev and test speaker (default: --utterances-per-speaker): more voices in a test "
                   "set of the same size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="parallel espeak-ng/mp3 workers (default: all cores)")
    acoustic = p.add_argument_group(
        "acoustic variety", "per-speaker conditions drawn from the seed; a range given here replaces the preset's"
    )
    acoustic.add_argument(
        "--acoustics", choices=["clean", "hard"], default="clean",
        help="preset: clean (default: noise -60..-45 dBFS, no speed change, no reverberation) or hard (noise "
        "-40..-25 dBFS, speed x0.85..1.15, room RT60 0.2..0.8 s)",
    )
    acoustic.add_argument("--noise-db-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                          help="white-noise level per speaker in dBFS, e.g. -40 -25 (speech RMS: about -19 dBFS)")
    acoustic.add_argument("--speed-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                          help="speed-perturbation factor per speaker (tempo and pitch, by resampling), e.g. 0.9 1.1")
    acoustic.add_argument("--reverb-rt60-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                          help="reverberation time of each speaker's room in seconds, e.g. 0.2 0.8 (0 0: none)")

    def run(args: argparse.Namespace) -> int:
        from fedasr.data.synth import synthesize_corpus

        summary = synthesize_corpus(
            args.out_dir,
            lang=args.lang,
            speakers=args.speakers,
            utterances_per_speaker=args.utterances_per_speaker,
            eval_speakers=args.eval_speakers,
            eval_utterances_per_speaker=args.eval_utterances_per_speaker,
            seed=args.seed,
            workers=args.workers,
            acoustics=args.acoustics,
            noise_db_range=args.noise_db_range,
            speed_range=args.speed_range,
            reverb_rt60_range=args.reverb_rt60_range,
        )
        splits = ", ".join(f"{name} {s['speakers']} speakers / {s['clips']} clips" for name, s in summary["splits"].items())
        state = "already there" if summary.get("skipped") else f"{summary['seconds']:.1f} s"
        print(f"synth: {args.out_dir}: {summary['clips']} clips, {summary['hours']:.2f} h ({splits}); {state}")
        if "acoustics" in summary:
            ranges = summary["acoustics"]
            print("synth: acoustics per speaker: noise {} to {} dBFS, speed x{} to x{}, RT60 {} to {} s".format(
                *ranges["noise_db_range"], *ranges["speed_range"], *ranges["reverb_rt60_range"]))
        return 0

    p.set_defaults(run=run)


def _optional_float(text: str) -> float | None:
    """A number, or none/null for "off"."""
    if text.strip().lower() in ("none", "null", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="Common Voice release folder -> train/dev/test manifests")
    p.add_argument("cv_dir", help="Common Voice folder of one locale (clips/, train.tsv, dev.tsv, test.tsv)")
    p.add_argument("out_dir", help="folder for train.csv, dev.csv, test.csv and prepare_report.json")
    p.add_argument("--lang", required=True, help="language code: fr, it, en, de, es (or any with --generic-normalizer)")
    p.add_argument("--workers", type=int, default=None, help="processes reading audio headers (default: all cores)")
    p.add_argument("--min-duration", type=float, default=0.0, help="drop clips shorter than this (seconds)")
    p.add_argument("--max-duration", type=float, default=None, help="drop clips longer than this (seconds)")
    p.add_argument("--min-words", type=int, default=1, help="drop sentences with fewer words")
    p.add_argument("--max-words", type=int, default=None, help="drop sentences with more words")
    p.add_argument("--keep-digits", action="store_true", help="keep sentences containing digits (default: drop)")
    p.add_argument("--strip-accents", action="store_true", help="remove diacritics from transcripts")
    p.add_argument(
        "--generic-normalizer",
        action="store_true",
        help="allow a language without its own rules (NFC, case folding, punctuation removal only)",
    )
    p.add_argument("--splits", nargs="+", default=["train", "dev", "test"], help="which TSVs to prepare")
    p.add_argument("--force", action="store_true", help="redo even if the outputs are up to date")
    p.add_argument("--max-chars-per-second", type=_optional_float, default=30.0,
                   help="skip clips whose transcript is longer than this many characters per second of audio: a "
                        "truncated mp3 keeps its full sentence (default 30; 'none': no check)")
    p.add_argument("--warn-longer-than", type=_optional_float, default=10.0,
                   help="count and report clips longer than this many seconds, kept (default 10; 'none': no warning)")

    def run(args: argparse.Namespace) -> int:
        from fedasr.data.commonvoice import prepare_common_voice, report_table

        report = prepare_common_voice(
            args.cv_dir,
            args.out_dir,
            lang=args.lang,
            workers=args.workers,
            min_duration=args.min_duration,
            max_duration=args.max_duration,
            min_words=args.min_words,
            max_words=args.max_words,
            keep_digits=args.keep_digits,
            strip_accents=args.strip_accents,
            generic_normalizer=args.generic_normalizer,
            splits=tuple(args.splits),
            force=args.force,
            max_chars_per_second=args.max_chars_per_second,
            warn_longer_than=args.warn_longer_than,
        )
        print(report_table(report))
        return 0

    p.set_defaults(run=run)


def _add_partition(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("partition", help="split the train manifest into a warm-up set and federated clients")
    p.add_argument("manifest_dir", help="folder with train.csv (output of `fedasr prepare`)")
    p.add_argument("out_dir", help="folder for partition.json, the per-client manifests and stats")
    p.add_argument("--mode", required=True, choices=["cross-silo", "cross-device", "iid"])
    p.add_argument("--clients", type=int, default=None, help="silos (cross-silo, iid; default 10) or a cap on clients (cross-device)")
    p.add_argument("--warmup-speakers", type=int, default=117, help="speakers held out for the central warm-up")
    p.add_argument("--min-utterances", type=int, default=2, help="cross-device: fewest utterances a speaker-client needs")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="share of each client's data kept for local validation")
    p.add_argument("--seed", type=int, default=0)
    non_iid = p.add_argument_group("non-IID silos", "off by default (balanced silos, speakers mixed at random)")
    non_iid.add_argument("--silo-sizes", choices=["equal", "skewed"], default="equal",
                         help="cross-silo, iid: equal (default: balanced by hours) or skewed (Zipf shares in a "
                         "seeded order; every silo keeps at least one speaker)")
    non_iid.add_argument("--size-exponent", type=float, default=1.0,
                         help="skewed sizes: shares proportional to rank^-EXPONENT (default 1: 1, 1/2, 1/3, ...)")
    non_iid.add_argument("--skew", choices=["none", "accent", "gender"], default="none",
                         help="cross-silo: silos each dominated by one accent or gender (the manifest's accents / "
                         "gender column)")
    non_iid.add_argument("--skew-share", type=float, default=0.8,
                         help="share of each group's speakers placed in the silos it dominates (default 0.8; "
                         "1: pure silos)")

    def run(args: argparse.Namespace) -> int:
        from fedasr.data.partition import partition_manifest

        result = partition_manifest(
            args.manifest_dir,
            args.out_dir,
            mode=args.mode,
            clients=args.clients,
            warmup_speakers=args.warmup_speakers,
            min_utterances=args.min_utterances,
            valid_fraction=args.valid_fraction,
            seed=args.seed,
            silo_sizes=args.silo_sizes,
            size_exponent=args.size_exponent,
            skew=args.skew,
            skew_share=args.skew_share,
        )
        print(result["summary_table"])
        return 0

    p.set_defaults(run=run)


def _add_train_central(sub: argparse._SubParsersAction) -> None:
    from fedasr.utils.settings import OVERRIDE_RULE

    p = sub.add_parser(
        "train-central",
        help="centralized / warm-up training from an experiment YAML; exports a seed checkpoint",
        description="Train on train_csv (warm-up: <partition>/warmup/train.csv), anneal on dev WER, keep the best "
        "checkpoint, test it and export <output_folder>/seed_checkpoint. Re-running resumes an interrupted run. "
        "After HPARAMS: SpeechBrain's run options as SpeechBrain recipes take them (--device=cuda:0 "
        "--precision=bf16 --noprogressbar ...) and the hparams overrides: --set key=value (as every fedasr command "
        "takes them), --key=value (SpeechBrain style: the same as --set key=value) or a YAML mapping string; "
        "applied in order. " + OVERRIDE_RULE,
    )
    p.add_argument("--device", default=None,
                   help="auto | cpu | cuda | cuda:N (default auto: a GPU when torch sees one); may also follow HPARAMS")
    p.add_argument("--progressbar", action="store_true", help="show SpeechBrain's progress bars")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of HPARAMS, e.g. --set number_of_epochs=3 --set decoding.beam_size=8 (also "
                   "after HPARAMS; applied before the overrides that follow HPARAMS)")
    p.add_argument("hparams", help="experiment YAML, e.g. hparams/CommonVoice/fr.yaml")
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="run options, e.g. --device=cuda:0 --precision=bf16 --noprogressbar, and overrides, e.g. "
                   "--set number_of_epochs=3 --set model=crdnn_tiny --manifest_folder=DIR --output_folder=DIR")

    def run(args: argparse.Namespace) -> int:
        from fedasr.models.train import split_run_options, train_central

        run_opts, overrides = split_run_options(args.overrides)
        overrides = [item for pair in args.set_overrides for item in ("--set", pair)] + overrides
        device = run_opts.pop("device", None)
        if device is not None and args.device is not None and device != args.device:
            raise ValueError(f"two devices given: --device {args.device} before HPARAMS and --device={device} after "
                             "it; give one")
        progressbar = args.progressbar and not run_opts.pop("noprogressbar", False)
        result = train_central(args.hparams, overrides, device=device or args.device or "auto",
                               progressbar=progressbar, run_opts=run_opts)
        print(json.dumps(result, indent=2))
        return 0

    p.set_defaults(run=run)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="WER/CER of a model on a manifest, per speaker and per group",
                       description="Decode MANIFEST with MODEL and print WER, CER and the word insertions, deletions "
                       "and substitutions, overall and per speaker / gender / age / accent (errors summed over "
                       "utterances, divided by the reference words). With --out, wer.txt shows each utterance's "
                       "reference and hypothesis aligned word by word, each error marked (I, D, S).")
    p.add_argument("checkpoint", metavar="MODEL",
                   help="a seed checkpoint folder (<output_folder>/seed_checkpoint of train-central), a federated run "
                        "folder (--output-dir of federate: its best_model.pt) or a model file of one "
                        "(best_model.pt, final_model.pt)")
    p.add_argument("manifest", help="manifest CSV to decode (e.g. test.csv)")
    p.add_argument("--decoding", choices=["beam", "greedy"], default="beam")
    p.add_argument("--out", default=None,
                   help="folder for hyps.tsv (one line per utterance), wer_report.json and wer_report.txt (WER, CER "
                   "and insertions / deletions / substitutions, overall and per group) and wer.txt (each utterance's "
                   "word alignment, SpeechBrain's wer.txt format)")
    p.add_argument("--max-utterances", type=int, default=None, help="decode N utterances, drawn in turn from every speaker")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N (default auto: a GPU when torch sees one)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="decoding under autocast at this precision (default fp32; fp16 needs a GPU)")

    def run(args: argparse.Namespace) -> int:
        from fedasr.models.evaluate import evaluate_checkpoint

        report = evaluate_checkpoint(args.checkpoint, args.manifest, decoding=args.decoding, out_dir=args.out,
                                     max_utterances=args.max_utterances, device=args.device,
                                     precision=args.precision)
        print(report["table"])
        return 0

    p.set_defaults(run=run)


def _add_federate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("federate", help="federated training from the seed checkpoint (Flower simulation)")
    p.add_argument("hparams", help="federated settings, e.g. hparams/fl/cross_silo.yaml")
    p.add_argument("--mode", choices=["cross-silo", "cross-device"], default=None, help="overrides `mode` of HPARAMS")
    p.add_argument("--partition", required=True, help="folder (or partition.json) written by `fedasr partition`")
    p.add_argument("--seed-checkpoint", required=True, help="seed checkpoint folder exported by the warm-up")
    p.add_argument("--output-dir", required=True, help="metrics.jsonl, checkpoints/, best_model.pt, summary.json")
    p.add_argument("--dev", default=None, help="dev manifest for the global model (default: dev.csv beside the partition's source)")
    p.add_argument("--test", default=None, help="test manifest (default: test.csv beside the partition's source)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from its last complete round")
    p.add_argument("--stop-after-round", type=int, default=0, help="stop cleanly after this round (resume later)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of HPARAMS, e.g. --set rounds=3 --set strategy.temperature=0.05 "
                   "--set device=cuda --set client_num_gpus=0.25 --set precision=bf16")

    def run(args: argparse.Namespace) -> int:
        from fedasr.fl.config import parse_overrides
        from fedasr.fl.simulation import SimulationError, federate, summary_line

        try:
            summary = federate(
                args.hparams, mode=args.mode, partition=args.partition, seed_checkpoint=args.seed_checkpoint,
                output_dir=args.output_dir, overrides=parse_overrides(args.overrides), dev_manifest=args.dev,
                test_manifest=args.test, resume=args.resume, stop_after_round=args.stop_after_round,
            )
        except SimulationError as err:
            # Flower's ServerApp thread can outlive a crashed engine, waiting for replies up to round_timeout:
            # report and leave now instead of hanging (measured: Ray failing to start under load hung the CLI).
            print(f"fedasr federate: error: {err}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(3)
        print(summary_line(summary))
        return 0

    p.set_defaults(run=run)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", aliases=["pipeline"],
        help="every stage end to end (synth or a Common Voice folder -> ... -> compare), resumable",
        description="Stages: 1 synth, 2 prepare, 3 partition, 4 warmup, 5 central, 6 cross-silo, 7 cross-device, "
        "8 compare. Finished stages are skipped on a re-run (done-markers in OUT_DIR).",
    )
    p.add_argument("out_dir", nargs="?", default="results/demo", help="pipeline folder (default: results/demo)")
    p.add_argument("--config", default=None, help="pipeline YAML (default: hparams/pipeline/demo.yaml)")
    p.add_argument("--corpus", default=None, help="a Common Voice folder of one locale: replaces the synth stage")
    p.add_argument("--lang", default=None, help="language (overrides the config's `language`)")
    p.add_argument("--stage", default=None, help="first stage to run (name or number)")
    p.add_argument("--stop-stage", default=None, help="last stage to run (name or number)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline setting, e.g. --set cross_silo.set.rounds=2 --set corpus.speakers=12")

    def run(args: argparse.Namespace) -> int:
        from fedasr.pipeline import DEFAULT_CONFIG, parse_set_overrides, run_pipeline

        overrides = parse_set_overrides(args.overrides)
        if args.lang:
            overrides["language"] = args.lang
        result = run_pipeline(args.out_dir, config_file=args.config or DEFAULT_CONFIG, overrides=overrides,
                              corpus=args.corpus, start=args.stage, stop=args.stop_stage)
        report = Path(result["report"])
        where = f" Report and plots: {report}" if (report / "compare.csv").exists() else ""
        print(f"Done in {result['seconds']} s.{where}")
        return 0

    p.set_defaults(run=run)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="table (Markdown + CSV) and plots from finished run folders")
    p.add_argument("run_dirs", nargs="+", help="output folders of train-central / federate runs")
    p.add_argument("--out", required=True, help="folder for compare.md, compare.csv, compare.json and the PNG plots")
    p.add_argument("--profile", default="v100", help="device power profile: v100 (250 W, PUE 1.67) or edge (7.5 W)")
    p.add_argument("--grid", default="france", help="grid carbon intensity: france, uk, us or china")

    def run(args: argparse.Namespace) -> int:
        from fedasr.report.compare import compare_runs

        summary = compare_runs(args.run_dirs, args.out, profile=args.profile, grid=args.grid)
        print(summary["table"])
        print(f"Written to {args.out}: compare.md, compare.csv, compare.json, " + ", ".join(summary["plot_names"]))
        return 0

    p.set_defaults(run=run)


def _add_dp_epsilon(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dp-epsilon", help="epsilon of fedasr's client-level DP for a noise multiplier, rounds and the "
                       "clients sampled per round (RDP accountant; no training)")
    p.add_argument("--noise", type=float, required=True, help="noise multiplier z (privacy.noise_multiplier)")
    p.add_argument("--rounds", type=int, required=True, help="number of rounds (releases)")
    p.add_argument("--clients", type=int, required=True, help="number of clients N in the partition")
    p.add_argument("--clients-per-round", type=int, default=None,
                   help="clients m the server draws each round, without replacement (default: all N)")
    p.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5; must be < 1 / clients)")
    p.add_argument("--accounting", choices=["sampled", "no-amplification"], default="sampled",
                   help="sampled (default): amplification by the sampling the server does; no-amplification: every "
                        "round counted in full")
    p.add_argument("--relation", choices=["add-or-remove-one", "replace-one"], default=None,
                   help="neighbouring relation (default: add-or-remove-one when every client trains every round, "
                        "replace-one otherwise, the only one fixed-size sampling is accounted under)")
    p.add_argument("--sampling-rate", type=float, default=None, help=argparse.SUPPRESS)  # old option: refused

    def run(args: argparse.Namespace) -> int:
        from fedasr.fl.privacy import client_level_epsilon

        if args.sampling_rate is not None:
            raise ValueError("--sampling-rate is gone: fedasr's server draws a fixed number of clients, and epsilon "
                             "depends on that number and the total. Pass --clients N --clients-per-round M")
        per_round = args.clients if args.clients_per_round is None else args.clients_per_round
        if args.clients < 1:
            raise ValueError(f"--clients must be >= 1, got {args.clients}")
        if not args.delta < 1.0 / args.clients:
            raise ValueError(f"--delta {args.delta} must be below 1 / clients = {1.0 / args.clients:.3g} (a larger "
                             "delta allows releasing one client's data outright)")
        epsilon, relation = client_level_epsilon(args.noise, args.rounds, args.clients, per_round, args.delta,
                                                 args.accounting, args.relation)
        finite = epsilon if epsilon != float("inf") else None
        result = {"epsilon": finite, "delta": args.delta, "neighbouring_relation": relation,
                  "sampling": (f"{per_round} of {args.clients} clients per round, uniformly without replacement"
                               if per_round < args.clients else "every client every round (no sampling)"),
                  "noise_multiplier": args.noise, "rounds": args.rounds, "clients": args.clients,
                  "clients_per_round": per_round, "accounting": args.accounting}
        if relation == "add-or-remove-one":  # also the figure comparable with sampled runs
            other, _ = client_level_epsilon(args.noise, args.rounds, args.clients, per_round, args.delta,
                                            args.accounting, "replace-one")
            result["epsilon_replace_one"] = other if other != float("inf") else None
        print(json.dumps(result))
        return 0

    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedasr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads of this process (default: torch's choice). On a busy small machine use 1: two threads "
        "per process on a loaded 2-core CPU made a training epoch about 15x slower in our measurement.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_prepare, _add_partition, _add_train_central, _add_evaluate, _add_federate,
                _add_demo, _add_compare, _add_dp_epsilon):
        add(sub)
    return parser


def configure_logging(level: int = logging.INFO) -> None:
    """The console log format of every fedasr command (and of a pipeline stage run in a child process)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from fedasr.utils.preflight import OutputFolderError

    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, PermissionError, OutputFolderError) as err:
        # Input errors carry a message naming the file, the row and the fix: show it, not a stack trace.
        if args.verbose:
            raise
        print(f"fedasr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if args.verbose or err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Writes are atomic: the files being written were dropped, finished ones and checkpoints are intact.
        print(f"fedasr {args.command}: error: disk full while writing {err.filename or 'an output file'} ({err}). "
              "Free some space and run it again: train-central and the pipeline resume from their last checkpoint, "
              "federate with --resume.",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
