"""Centralized (warm-up) training from an experiment YAML: ``fedasr train-central``.

One call = tokenizer (trained once, reused on resume; or the ``init_from`` checkpoint's) -> [``init_from``: that
checkpoint's weights] -> SpeechBrain Brain.fit with NewBob annealing on dev WER
and a Checkpointer that keeps the best model by dev WER -> test with the best checkpoint -> export of a
self-contained seed checkpoint (fedasr.models.checkpoint). Interrupted runs resume from their last checkpoint:
the epoch counter, model, optimizer, annealing state and normaliser statistics are all recoverables.

Output folder::

    hyperparams.yaml   resolved experiment YAML        train_log.txt    SpeechBrain-style log
    save/              tokenizer.model + CKPT+* folders (Checkpointer)
    test_hyps.txt      per-utterance test hypotheses    seed_checkpoint/ the export
    result.json        dev/test WER, epochs, seconds     energy.json      codecarbon's measurement (if installed)
    tensorboard/       TensorBoard events, step = epoch (when tensorboard is installed; tags: fedasr/report/round_log.py)

Device and SpeechBrain run options: ``device`` (auto | cpu | cuda | cuda:N, fedasr/utils/device.py) is resolved and
checked before anything is read or written; ``run_opts`` are SpeechBrain's own (``precision``, ``eval_precision``,
``grad_accumulation_factor``, ``debug``, ...: :data:`RUN_OPTIONS`), given to the Brain as SpeechBrain's
``run_opts``; ``fedasr train-central`` reads them from the command line as SpeechBrain recipes do
(:func:`split_run_options`). The exported seed checkpoint is fp32 whatever the precision.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Sequence

import speechbrain as sb
import torch

from fedasr.models.brain import ASRBrain, EpochAverage
from fedasr.models.checkpoint import check_checkpoint, check_resume_fits, export_checkpoint, load_model_state
from fedasr.models.dataio import make_dataset, manifest_sentences
from fedasr.models.hparams import Experiment, HparamsError, load_experiment
from fedasr.models.model import build_acoustic_model, count_parameters
from fedasr.models.rnn_precision import keep_rnns_in_fp32
from fedasr.models.tokenizer import TOKENIZER_FILENAME, Tokenizer, train_tokenizer
from fedasr.report.energy import track_energy
from fedasr.report.round_log import TENSORBOARD_DIR, StepTensorboardLogger, TrainLoggers, tensorboard_available
from fedasr.utils.device import check_precision, loader_options, peak_gpu_memory, resolve_device
from fedasr.utils.io import atomic_open, atomic_write_json, atomic_write_text
from fedasr.utils.preflight import check_writable, space_for_parameters

logger = logging.getLogger(__name__)
SEED_CHECKPOINT_DIRNAME = "seed_checkpoint"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def global_tokenizer(hp: dict, save_folder: Path) -> Tokenizer:
    """Load the run's tokenizer, training it on the train manifest's text the first time only (a run that
    fine-tunes a checkpoint, ``init_from``, takes that checkpoint's tokenizer instead)."""
    path = save_folder / TOKENIZER_FILENAME
    if path.exists():
        return Tokenizer(path)
    if hp.get("init_from"):
        with atomic_open(path, "wb") as handle:
            handle.write((check_checkpoint(hp["init_from"]) / TOKENIZER_FILENAME).read_bytes())
        return Tokenizer(path)
    logger.info("training the %s tokenizer (vocab %s) on %s", hp["token_type"], hp["vocab_size"], hp["train_csv"])
    return train_tokenizer(manifest_sentences(hp["train_csv"]), path, vocab_size=int(hp["vocab_size"]),
                           model_type=hp["token_type"], character_coverage=float(hp["character_coverage"]))


def start_from_checkpoint(model: torch.nn.Module, checkpoint_dir: str | os.PathLike) -> None:
    """Fine-tuning (``init_from``): the checkpoint's weights and normaliser statistics, the statistics frozen as in
    federated training. A resumed run's own checkpoint replaces the weights when SpeechBrain recovers it."""
    model.load_state_dict(load_model_state(checkpoint_dir, model=model))  # checks the weights and tokenizer fit
    model.freeze_normalizer()
    logger.info("starting from %s (normaliser statistics frozen)", checkpoint_dir)


def epoch_average_decay(experiment: Experiment) -> float:
    """The experiment's ``ema_decay`` (0: the epochs are not averaged), checked."""
    decay = float(experiment.hparams.get("ema_decay") or 0.0)
    if not 0.0 <= decay < 1.0:
        raise HparamsError(f"{experiment.source}: ema_decay must lie in [0, 1) (0: no averaging), got {decay}; "
                           "fix it in the YAML or with --ema_decay=D")
    return decay


def build_brain(experiment: Experiment, tokenizer: Tokenizer, out_dir: Path, *, device: str = "cpu",
                progressbar: bool = False, run_opts: dict | None = None) -> ASRBrain:
    """The Brain of a centralized run: model, Adam/Adadelta from the YAML, NewBob, Checkpointer, train log.

    ``run_opts``: more SpeechBrain run options (precision, ...); device, progress bar and max_grad_norm (the
    experiment YAML's) are set here."""
    hp = experiment.hparams
    model = build_acoustic_model(hp, source=f"{experiment.source} (model {experiment.model_name})")
    epoch_counter = sb.utils.epoch_loop.EpochCounter(int(hp["number_of_epochs"]))
    lr_annealing = sb.nnet.schedulers.NewBobScheduler(
        initial_value=float(hp["lr"]), improvement_threshold=float(hp["improvement_threshold"]),
        annealing_factor=float(hp["annealing_factor"]), patient=int(hp["patient"]),
    )
    recoverables = {"model": model, "epoch_counter": epoch_counter, "lr_annealing": lr_annealing}
    decay = epoch_average_decay(experiment)
    epoch_average = EpochAverage(model, decay) if decay > 0 else None
    if epoch_average is not None:
        recoverables["epoch_average"] = epoch_average
    checkpointer = sb.utils.checkpoints.Checkpointer(out_dir / "save", recoverables=recoverables)
    brain_hparams = {
        "tokenizer": tokenizer,
        "valid_search": hp["valid_search"],
        "test_search": hp["test_search"],
        "epoch_counter": epoch_counter,
        "lr_annealing": lr_annealing,
        # train_log.txt and TensorBoard (step = epoch; a resumed run hides the events of the epochs it redoes)
        "train_logger": TrainLoggers(
            sb.utils.train_logger.FileTrainLogger(save_file=str(out_dir / "train_log.txt")),
            StepTensorboardLogger(out_dir / TENSORBOARD_DIR) if tensorboard_available() else None),
        "keep_checkpoints": int(hp["keep_checkpoints"]),
        "hyps_file": str(out_dir / "test_hyps.txt"),
        "epoch_average": epoch_average,
    }
    return ASRBrain(
        modules={"model": model}, opt_class=hp["opt_class"], hparams=brain_hparams,
        run_opts={**(run_opts or {}), "device": device, "noprogressbar": not progressbar,
                  "max_grad_norm": float(hp["max_grad_norm"])},
        checkpointer=checkpointer,
    )


def train_central(experiment_file: str | os.PathLike, overrides: Sequence[str] | str | dict | None = None, *,
                  device: str = "auto", progressbar: bool = False, run_opts: dict | None = None) -> dict:
    """Train, test and export a seed checkpoint; returns the summary also written to ``result.json``.

    ``device``: auto | cpu | cuda | cuda:N (auto: a GPU when torch sees one); ``run_opts``: SpeechBrain run options
    (see :data:`RUN_OPTIONS`), e.g. ``{"precision": "bf16"}``. Both are checked before any file is written."""
    start = time.perf_counter()
    device = resolve_device(device, what="train-central device")
    run_opts = check_run_options(run_opts, device)
    experiment = load_experiment(experiment_file, overrides)
    hp = experiment.hparams
    out_dir = Path(hp["output_folder"])
    copies = (int(hp["keep_checkpoints"]) + 2) * (3 if epoch_average_decay(experiment) > 0 else 1)  # + average, x
    check_writable(out_dir, space_for_parameters(hp["modules"].values(), copies), what="output_folder")
    check_resume_fits(out_dir / "save", build_acoustic_model(hp, source=f"{experiment.source} (model {experiment.model_name})"))
    atomic_write_text(out_dir / "hyperparams.yaml", experiment.resolved_yaml)
    seed_everything(int(hp["seed"]))  # again: the tokenizer and the data order come after the model build

    tokenizer = global_tokenizer(hp, out_dir / "save")
    datasets = {
        split: make_dataset(hp[f"{split}_csv"], tokenizer, sample_rate=hp["sample_rate"],
                            sorting=hp["sorting"] if split == "train" else "ascending",
                            max_utterances=hp["dev_max_utterances"] if split == "dev" else None)
        for split in ("train", "dev", "test")
    }
    brain = build_brain(experiment, tokenizer, out_dir, device=device, progressbar=progressbar, run_opts=run_opts)
    keep_rnns_in_fp32(brain.modules.model, device, run_opts.get("precision", "fp32"))  # bf16 on CUDA
    if hp.get("init_from"):
        start_from_checkpoint(brain.modules.model, hp["init_from"])
    feeding = loader_options(device, hp.get("num_workers", "auto"))  # workers and pinned memory on a GPU
    loader = {"batch_size": int(hp["batch_size"]), "shuffle": hp["sorting"] == "random", **feeding}
    eval_loader = {"batch_size": int(hp["eval_batch_size"]), **feeding}
    with track_energy(out_dir):  # energy.json, when codecarbon is installed
        brain.fit(brain.hparams.epoch_counter, datasets["train"], datasets["dev"],
                  train_loader_kwargs=dict(loader), valid_loader_kwargs=dict(eval_loader))
        epochs_trained = brain.hparams.epoch_counter.current  # before testing recovers the best epoch's counter
        best = brain.checkpointer.find_checkpoint(min_key="WER") if hp["valid_search"] else None
        # Test the best checkpoint by dev WER (the latest one when the dev set is not decoded).
        brain.evaluate(datasets["test"], min_key="WER" if best is not None else None,
                       test_loader_kwargs=dict(eval_loader))
        brain.hparams.train_logger.close()
    model = brain.modules.model
    test_wer = brain.test_stats.get("WER", float("nan")) / 100
    model.freeze_normalizer()
    meta = {
        "model": experiment.model_name,
        "language": hp.get("language"),
        "vocab_size": int(hp["vocab_size"]),
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "num_parameters": count_parameters(model),
        "dev_wer": best.meta["WER"] / 100 if best is not None else float("nan"),
        "dev_decoding": hp["valid_search"],
        "best_epoch": best.meta.get("epoch") if best is not None else None,
        "test_wer": test_wer,
        "test_cer": brain.test_stats.get("CER", float("nan")) / 100,
        "test_decoding": hp["test_search"],
        "epochs": epochs_trained,
        "train_csv": str(hp["train_csv"]),
        "train_utterances": len(datasets["train"]),
    }
    export_dir = export_checkpoint(out_dir / SEED_CHECKPOINT_DIRNAME, state_dict=model.state_dict(),
                                   tokenizer_path=tokenizer.model_path, resolved_yaml=experiment.resolved_yaml,
                                   meta=meta)
    result = {**meta, "seed_checkpoint": str(export_dir), "output_folder": str(out_dir),
              "seconds": round(time.perf_counter() - start, 1), "device": device,
              "precision": run_opts.get("precision", "fp32")}
    peak = peak_gpu_memory(device)
    if peak is not None:  # on CUDA only
        result["gpu_peak_mib"] = round(peak / 2**20, 1)
    atomic_write_json(out_dir / "result.json", result)
    return result


# ---- SpeechBrain's run options ------------------------------------------------------------------------------------
# The options of speechbrain.utils.run_opts.RunOptions that fedasr passes to the Brain, as SpeechBrain recipes take
# them on the command line (--device=cuda:0 --precision=bf16 --noprogressbar). Left out: max_grad_norm (a key of
# the experiment YAML: --max_grad_norm=N overrides it), test_only (use `fedasr evaluate`), the multi-GPU launchers
# (data_parallel_backend, distributed_backend: train-central is one process on one device), param_file (the HPARAMS
# argument) and log_config.
UNSUPPORTED_RUN_OPTIONS = {
    "test_only": "train-central trains; decode a checkpoint with `fedasr evaluate`",
    "data_parallel_backend": "train-central runs on one device",
    "distributed_backend": "train-central runs on one device",
    "find_unused_parameters": "train-central runs on one device",
}
_NOT_RUN_OPTIONS = {"max_grad_norm", "param_file", "log_config", "overridden_args", "tqdm_barcolor",
                    "distributed_launch", "data_parallel_count", "jit_module_keys", "compile_module_keys"}


def _run_option_defaults() -> dict:
    import dataclasses

    from speechbrain.utils.run_opts import HELP_TEXTS, RunOptions

    return {f.name: getattr(RunOptions(), f.name) for f in dataclasses.fields(RunOptions)
            if f.name in HELP_TEXTS and f.name not in _NOT_RUN_OPTIONS}


def run_options_parser():
    """An argparse parser of SpeechBrain's run options (flags stay flags, typed values keep SpeechBrain's type)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name, default in _run_option_defaults().items():
        if name == "device":
            parser.add_argument("--device", default=argparse.SUPPRESS)
        elif default is False:
            parser.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS)
        elif "precision" in name:
            parser.add_argument(f"--{name}", choices=["fp32", "fp16", "bf16"], default=argparse.SUPPRESS)
        else:
            kind = type(default) if default is not None else int
            parser.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS)
    return parser


def split_run_options(args: Sequence[str]) -> tuple[dict, list[str]]:
    """SpeechBrain's run options among command-line arguments -> (run options given, the rest: hparams overrides).

    ``["--device=cuda:0", "--precision=bf16", "--noprogressbar", "--lr=0.5"]`` ->
    ``({"device": "cuda:0", "precision": "bf16", "noprogressbar": True}, ["--lr=0.5"])``. A bad value of a run
    option (``--precision=fp8``) is a ValueError naming the choices."""
    import argparse

    parser = run_options_parser()
    parser.exit_on_error = False
    try:
        given, rest = parser.parse_known_args(list(args))
    except argparse.ArgumentError as err:
        raise ValueError(f"SpeechBrain run option: {err}") from None
    return vars(given), rest


def check_run_options(run_opts: dict | None, device: str) -> dict:
    """Validated SpeechBrain run options for a Brain on the resolved ``device`` (device itself is not one here)."""
    run_opts = dict(run_opts or {})
    run_opts.pop("device", None)
    known = _run_option_defaults()
    for name in run_opts:
        if name in UNSUPPORTED_RUN_OPTIONS:
            raise ValueError(f"SpeechBrain run option --{name} is not supported by train-central: "
                             f"{UNSUPPORTED_RUN_OPTIONS[name]}")
        if name not in known:
            raise ValueError(f"{name!r} is not a SpeechBrain run option fedasr passes on (known: {sorted(known)})")
    for name in ("precision", "eval_precision"):
        if name in run_opts:
            run_opts[name] = check_precision(run_opts[name], device, what=f"--{name}")
    return run_opts
