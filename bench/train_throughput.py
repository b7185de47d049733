"""Training throughput of the acoustic models on CPU: seconds of audio trained per second of wall time.

For each model: build it from its YAML (through the same experiment composition as `fedasr train-central`),
train a tokenizer on the corpus text, then time real training steps (ASRBrain.fit_batch: forward, joint loss,
backward, gradient clipping, optimizer step) on batches of real clips, after warm-up steps.

    .venv/bin/python bench/train_throughput.py                       # synthesizes a small corpus if needed
    .venv/bin/python bench/train_throughput.py --models crdnn_tiny crdnn --batches 4 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedasr.models.brain import ASRBrain  # noqa: E402
from fedasr.models.dataio import make_dataset, manifest_sentences  # noqa: E402
from fedasr.models.hparams import load_experiment  # noqa: E402
from fedasr.models.model import build_acoustic_model, count_parameters  # noqa: E402
from fedasr.models.tokenizer import train_tokenizer  # noqa: E402

TINY_EXPERIMENT = REPO / "hparams" / "CommonVoice" / "synth.yaml"
FULL_EXPERIMENT = REPO / "hparams" / "CommonVoice" / "fr.yaml"


def corpus_manifest(corpus_dir: Path) -> Path:
    """``corpus_dir/manifests/train.csv``, synthesizing and preparing a small corpus the first time."""
    from fedasr.data.commonvoice import prepare_common_voice
    from fedasr.data.synth import synthesize_corpus

    synthesize_corpus(corpus_dir / "cv", lang="fr", speakers=6, utterances_per_speaker=8, seed=0, workers=2)
    prepare_common_voice(corpus_dir / "cv", corpus_dir / "manifests", lang="fr", workers=1)
    return corpus_dir / "manifests" / "train.csv"


def measure(model_name: str, manifest: Path, *, batch_size: int, batches: int, warmup: int, work: Path) -> dict:
    experiment_file = TINY_EXPERIMENT if model_name.endswith("_tiny") else FULL_EXPERIMENT
    exp = load_experiment(experiment_file, [f"--model={model_name}", f"--manifest_folder={manifest.parent}",
                                            f"--output_folder={work}"])
    hp = exp.hparams
    tokenizer = train_tokenizer(manifest_sentences(manifest), work / f"{model_name}.model",
                                vocab_size=min(int(hp["vocab_size"]), 60))
    model = build_acoustic_model(hp, source=model_name)
    dataset = make_dataset(manifest, tokenizer, sample_rate=hp["sample_rate"], sorting="random")
    brain = ASRBrain(modules={"model": model}, opt_class=hp["opt_class"],
                     hparams={"tokenizer": tokenizer, "valid_search": None, "test_search": None},
                     run_opts={"device": "cpu", "noprogressbar": True}, checkpointer=None)
    brain.on_fit_start()
    brain.on_stage_start(None, epoch=1)
    brain.modules.train()
    loader = brain.make_dataloader(dataset, stage=None, batch_size=batch_size, shuffle=False, ckpt_prefix=None)
    stream = itertools.cycle(loader)
    for _ in range(warmup):
        brain.fit_batch(next(stream))
    audio_seconds, start = 0.0, time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
        wavs, lens = batch.sig
        audio_seconds += float((lens * wavs.shape[1]).sum()) / hp["sample_rate"]
        brain.fit_batch(batch)
    wall = time.perf_counter() - start
    return {"model": model_name, "parameters": count_parameters(model), "batch_size": batch_size, "batches": batches,
            "audio_s": round(audio_seconds, 1), "wall_s": round(wall, 2), "audio_s_per_s": round(audio_seconds / wall, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["crdnn_tiny", "conformer_tiny", "ctc_tiny", "crdnn"])
    parser.add_argument("--manifest", type=Path, default=None, help="train manifest to draw batches from")
    parser.add_argument("--corpus-dir", type=Path, default=REPO / "results" / "bench_corpus",
                        help="where to synthesize a small corpus when --manifest is not given")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    manifest = args.manifest or corpus_manifest(args.corpus_dir)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}, batch {args.batch_size}, {args.batches} timed batches after {args.warmup} warm-up")
    print(f"{'model':<16} {'params':>11} {'audio s':>8} {'wall s':>8} {'audio s / s':>12}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row = measure(name, manifest, batch_size=args.batch_size, batches=args.batches, warmup=args.warmup,
                          work=Path(tmp))
            rows.append(row)
            print(f"{row['model']:<16} {row['parameters']:>11,} {row['audio_s']:>8} {row['wall_s']:>8} "
                  f"{row['audio_s_per_s']:>12}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
