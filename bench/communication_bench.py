"""Communication per client and round: bytes of a reply in fp32 / fp16 / bf16, and what half precision costs in WER.

1. Bytes: a client's reply (the floating-point state of the model built from its YAML) serialized as fedasr sends
   it: fp32 (Flower's numpy arrays) or an fp16 / bf16 update (``fedasr.fl.arrays.encode_update``), with the
   seconds to encode it on the client and decode it on the server. The global model always goes out in fp32.
2. WER: the same short cross-silo run (``fedasr federate``, tiny model, WER-softmax) with each encoding, from the
   same seed and partition; reports bytes received per client per round (from metrics.jsonl) and dev/test WER.

    .venv/bin/python bench/communication_bench.py --corpus DIR --seed-checkpoint DIR --work-dir DIR
    .venv/bin/python bench/communication_bench.py --skip-runs                       # bytes only (crdnn, crdnn_tiny)

--corpus: a prepared manifest folder (train.csv, dev.csv, test.csv); --seed-checkpoint: a warm-up export for the
tiny model (e.g. `fedasr train-central hparams/CommonVoice/synth.yaml ...`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aggregation_bench import model_shapes  # noqa: E402  (one builder of model shapes for the benches)
from fedasr.fl.arrays import decode_update, encode_update, numpy_to_arrayrecord  # noqa: E402
from fedasr.fl.metrics_log import METRICS_FILE, read_metrics_rows  # noqa: E402

ENCODINGS = ("fp32", "fp16", "bf16")


def reply_bytes(model: str) -> list[dict]:
    """Serialized bytes of one reply of ``model`` in each encoding, with encode / decode seconds."""
    shapes = model_shapes(model)
    sent = numpy_to_arrayrecord({key: np.full(shape, 0.5, dtype=np.float32) for key, shape in shapes})
    trained = numpy_to_arrayrecord({key: np.full(shape, 0.5 + 1e-3, dtype=np.float32) for key, shape in shapes})
    params = sum(int(np.prod(shape)) for _, shape in shapes)
    rows = []
    for encoding in ENCODINGS:
        started = time.perf_counter()
        encoded = encode_update(trained, sent, encoding)
        encoded_at = time.perf_counter()
        decode_update(encoded, sent)
        rows.append({"model": model, "parameters": params, "encoding": encoding,
                     "bytes": sum(len(array.data) for array in encoded.values()),
                     "encode_s": round(encoded_at - started, 2), "decode_s": round(time.perf_counter() - encoded_at, 2)})
    return rows


def federate(encoding: str, partition: Path, seed: Path, out: Path, rounds: int, local_epochs: int) -> list[dict]:
    settings = [f"rounds={rounds}", f"local_epochs={local_epochs}", "lr=0.1", "client_optimizer.name=sgd", "strategy.temperature=1", f"update_encoding={encoding}",
                "evaluation.server_wer_utterances=8", "evaluation.test_decoding=greedy"]
    command = [str(Path(sys.executable).parent / "fedasr"), "federate", str(REPO / "hparams/fl/cross_silo.yaml"),
               "--partition", str(partition), "--seed-checkpoint", str(seed), "--output-dir", str(out)]
    for item in settings:
        command += ["--set", item]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"federate with {encoding} failed:\n{done.stderr[-3000:]}")
    return read_metrics_rows(out / METRICS_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["crdnn", "crdnn_tiny"])
    parser.add_argument("--corpus", type=Path, help="prepared manifests (train/dev/test.csv) for the WER runs")
    parser.add_argument("--seed-checkpoint", type=Path, help="tiny-model seed checkpoint for the WER runs")
    parser.add_argument("--work-dir", type=Path, default=REPO / "results" / "communication_bench")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--encodings", nargs="+", default=["fp32", "fp16"], choices=ENCODINGS,
                        help="encodings of the WER runs (default fp32 fp16; add bf16)")
    parser.add_argument("--clients", type=int, default=4, help="cross-silo silos of the WER runs")
    parser.add_argument("--skip-runs", action="store_true", help="bytes only, no federated runs")
    args = parser.parse_args(argv)

    print(f"{'model':<12} {'parameters':>12} {'encoding':>8} {'MB per reply':>13} {'vs fp32':>8} {'encode s':>9} {'decode s':>9}")
    for model in args.models:
        rows = reply_bytes(model)
        for row in rows:
            print(f"{model:<12} {row['parameters']:>12,} {row['encoding']:>8} {row['bytes'] / 2**20:>13.2f} "
                  f"{row['bytes'] / rows[0]['bytes']:>8.3f} {row['encode_s']:>9} {row['decode_s']:>9}", flush=True)
    if args.skip_runs:
        return 0
    if not (args.corpus and args.seed_checkpoint):
        parser.error("the WER runs need --corpus and --seed-checkpoint (or pass --skip-runs)")
    from fedasr.data.partition import partition_manifest

    partition = args.work_dir / "partition"
    partition_manifest(args.corpus, partition, mode="cross-silo", clients=args.clients, warmup_speakers=0, seed=0)
    print(f"\ncross-silo, {args.clients} silos, {args.rounds} rounds x {args.local_epochs} local epochs, tiny model from "
          f"{args.seed_checkpoint}")
    print(f"{'encoding':>8} {'KB received / client / round':>29} {'dev WER per round':>32} {'test WER':>9} {'wall s':>7}")
    for encoding in args.encodings:
        started = time.perf_counter()
        rows = federate(encoding, partition, args.seed_checkpoint, args.work_dir / encoding, args.rounds, args.local_epochs)
        per_client = np.mean([r["bytes_received"] / max(1, r["sampled"]) for r in rows[1:]]) / 1024
        dev = " ".join(f"{r['dev_wer']:.4f}" for r in rows)
        print(f"{encoding:>8} {per_client:>29.1f} {dev:>32} {rows[-1].get('test_wer', float('nan')):>9.4f} "
              f"{time.perf_counter() - started:>7.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
