"""Centralized (warm-up) training from an experiment YAML: ``fedasr train-central``.

One call = tokenizer (trained once, reused on resume) -> SpeechBrain Brain.fit with NewBob annealing on dev WER
and a Checkpointer that keeps the best model by dev WER -> test with the best checkpoint -> export of a
self-contained seed checkpoint (fedasr.models.checkpoint). Interrupted runs resume from their last checkpoint:
the epoch counter, model, optimizer, annealing state and normaliser statistics are all recoverables.

Output folder::

    hyperparams.yaml   resolved experiment YAML        train_log.txt    SpeechBrain-style log
    save/              tokenizer.model + CKPT+* folders (Checkpointer)
    test_hyps.txt      per-utterance test hypotheses    seed_checkpoint/ the export
    result.json        dev/test WER, epochs, seconds     energy.json      codecarbon's measurement (if installed)
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

from fedasr.models.brain import ASRBrain
from fedasr.models.checkpoint import check_resume_fits, export_checkpoint
from fedasr.models.dataio import make_dataset, manifest_sentences
from fedasr.models.hparams import Experiment, load_experiment
from fedasr.models.model import build_acoustic_model, count_parameters
from fedasr.models.tokenizer import TOKENIZER_FILENAME, Tokenizer, train_tokenizer
from fedasr.report.energy import track_energy
from fedasr.utils.io import atomic_write_json, atomic_write_text
from fedasr.utils.preflight import check_writable, space_for_parameters

logger = logging.getLogger(__name__)
SEED_CHECKPOINT_DIRNAME = "seed_checkpoint"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def global_tokenizer(hp: dict, save_folder: Path) -> Tokenizer:
    """Load the run's tokenizer, training it on the train manifest's text the first time only."""
    path = save_folder / TOKENIZER_FILENAME
    if path.exists():
        return Tokenizer(path)
    logger.info("training the %s tokenizer (vocab %s) on %s", hp["token_type"], hp["vocab_size"], hp["train_csv"])
    return train_tokenizer(manifest_sentences(hp["train_csv"]), path, vocab_size=int(hp["vocab_size"]),
                           model_type=hp["token_type"], character_coverage=float(hp["character_coverage"]))


def build_brain(experiment: Experiment, tokenizer: Tokenizer, out_dir: Path, *, device: str = "cpu",
                progressbar: bool = False) -> ASRBrain:
    """The Brain of a centralized run: model, Adam/Adadelta from the YAML, NewBob, Checkpointer, train log."""
    hp = experiment.hparams
    model = build_acoustic_model(hp, source=f"{experiment.source} (model {experiment.model_name})")
    epoch_counter = sb.utils.epoch_loop.EpochCounter(int(hp["number_of_epochs"]))
    lr_annealing = sb.nnet.schedulers.NewBobScheduler(
        initial_value=float(hp["lr"]), improvement_threshold=float(hp["improvement_threshold"]),
        annealing_factor=float(hp["annealing_factor"]), patient=int(hp["patient"]),
    )
    checkpointer = sb.utils.checkpoints.Checkpointer(
        out_dir / "save", recoverables={"model": model, "epoch_counter": epoch_counter, "lr_annealing": lr_annealing},
    )
    brain_hparams = {
        "tokenizer": tokenizer,
        "valid_search": hp["valid_search"],
        "test_search": hp["test_search"],
        "epoch_counter": epoch_counter,
        "lr_annealing": lr_annealing,
        "train_logger": sb.utils.train_logger.FileTrainLogger(save_file=str(out_dir / "train_log.txt")),
        "keep_checkpoints": int(hp["keep_checkpoints"]),
        "hyps_file": str(out_dir / "test_hyps.txt"),
    }
    return ASRBrain(
        modules={"model": model}, opt_class=hp["opt_class"], hparams=brain_hparams,
        run_opts={"device": device, "noprogressbar": not progressbar, "max_grad_norm": float(hp["max_grad_norm"])},
        checkpointer=checkpointer,
    )


def train_central(experiment_file: str | os.PathLike, overrides: Sequence[str] | str | dict | None = None, *,
                  device: str = "cpu", progressbar: bool = False) -> dict:
    """Train, test and export a seed checkpoint; returns the summary also written to ``result.json``."""
    start = time.perf_counter()
    experiment = load_experiment(experiment_file, overrides)
    hp = experiment.hparams
    out_dir = Path(hp["output_folder"])
    check_writable(out_dir, space_for_parameters(hp["modules"].values(), int(hp["keep_checkpoints"]) + 2), what="output_folder")
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
    brain = build_brain(experiment, tokenizer, out_dir, device=device, progressbar=progressbar)
    loader = {"batch_size": int(hp["batch_size"]), "shuffle": hp["sorting"] == "random"}
    eval_loader = {"batch_size": int(hp["eval_batch_size"])}
    with track_energy(out_dir):  # energy.json, when codecarbon is installed
        brain.fit(brain.hparams.epoch_counter, datasets["train"], datasets["dev"],
                  train_loader_kwargs=dict(loader), valid_loader_kwargs=dict(eval_loader))
        epochs_trained = brain.hparams.epoch_counter.current  # before testing recovers the best epoch's counter
        best = brain.checkpointer.find_checkpoint(min_key="WER") if hp["valid_search"] else None
        # Test the best checkpoint by dev WER (the latest one when the dev set is not decoded).
        brain.evaluate(datasets["test"], min_key="WER" if best is not None else None,
                       test_loader_kwargs=dict(eval_loader))
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
              "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(out_dir / "result.json", result)
    return result
