"""Server aggregation of K client replies: peak memory and seconds, list-then-average (before) vs streamed (after).

The replies are Flower ArrayRecords holding float32 arrays shaped like the floating-point state of a real fedasr
model (built from its YAML: ``crdnn`` = the reference's ~148 M parameters, 565 MiB per reply in fp32). Two
serialized replies are built before the measurement starts and handed out in turn by a generator, so the
figures are what the aggregation itself costs (conversion of every array of every reply + the weighted sum):

  before : every reply converted to numpy first, then averaged key by key (fedasr <= 2026-11-24:
           ``weighted_average([arrays_to_numpy(r) for r in replies], w)``): O(K x model);
  after  : ``fedasr.fl.arrays.weighted_average(replies, w)``: one float64 buffer per key, replies converted one
           array at a time and released: O(model).

Each (method, K) runs in its own process (numpy + flwr only), so its peak RSS (VmHWM) is its own; the figure
reported is the peak minus the RSS after imports. "before" at K=100 would need ~60 GB here: it runs at small K
and the per-reply slope is extrapolated.

NOTE (Flower 1.42): ``Grid.send_and_receive`` returns a list of all K replies (serialized bytes, K x model), so a
real server still holds those during the round; streaming removes the K x model of converted copies on top.

    .venv/bin/python bench/aggregation_bench.py                     # crdnn, before K=1,2,4; after K=4,20
    .venv/bin/python bench/aggregation_bench.py --before --after 100   # the streamed sum of 100 crdnn replies
    .venv/bin/python bench/aggregation_bench.py --model crdnn_tiny --before 10 100 --after 10 100
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def model_shapes(model: str) -> list[tuple[str, list[int]]]:
    """(key, shape) of the floating-point tensors of ``model`` built from hparams/models/<model>.yaml."""
    sys.path.insert(0, str(REPO))
    from fedasr.fl.arrays import travels
    from fedasr.models.hparams import load_experiment
    from fedasr.models.model import build_acoustic_model

    experiment = REPO / "hparams" / "CommonVoice" / ("synth.yaml" if model.endswith("_tiny") else "fr.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        exp = load_experiment(experiment, [f"--model={model}", f"--manifest_folder={tmp}", f"--output_folder={tmp}"])
        state = build_acoustic_model(exp.hparams, source=model).state_dict()
    return [(key, list(tensor.shape)) for key, tensor in state.items() if travels(tensor)]


def status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str, count: int, shapes_file: Path) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    sys.path.insert(0, str(REPO))
    from fedasr.fl.arrays import arrays_to_numpy, weighted_average

    shapes = json.loads(shapes_file.read_text())

    # Two serialized replies (values 1 and 2 everywhere) built before the baseline and handed out in turn, as
    # Flower hands the server its already received replies: the figures are the aggregation's own work.
    built = [ArrayRecord({key: Array(np.full(shape, value, dtype=np.float32)) for key, shape in shapes})
             for value in (1.0, 2.0)]

    def replies():
        for k in range(count):
            yield built[k % 2]

    def list_then_average(records, weights):
        arrays = [arrays_to_numpy(r) for r in records]
        averaged = {}
        for key, first in arrays[0].items():
            total = np.zeros(first.shape, dtype=np.float64)
            for weight, item in zip(weights, arrays):
                total += float(weight) * item[key].astype(np.float64)
            averaged[key] = total.astype(first.dtype)
        return averaged

    weights = np.full(count, 1.0 / count)
    baseline = status_mb("VmRSS")
    started, cpu_started = time.perf_counter(), time.process_time()
    result = (list_then_average if method == "before" else weighted_average)(replies(), weights)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    expected = float(np.mean([1.0 + k % 2 for k in range(count)]))
    assert all(v.size == 0 or abs(float(v.flat[0]) - expected) <= 1e-6 * expected for v in result.values()), "wrong sum"
    params = sum(int(np.prod(shape)) for _, shape in shapes)
    return {"method": method, "replies": count, "parameters": params, "seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
            "peak_mb": round(status_mb("VmHWM") - baseline, 1), "model_mb_fp32": round(params * 4 / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crdnn", help="model YAML name in hparams/models (default crdnn)")
    parser.add_argument("--before", type=int, nargs="*", default=[1, 2, 4], help="reply counts for list-then-average")
    parser.add_argument("--after", type=int, nargs="*", default=[4, 20], help="reply counts for the streamed sum (100: ~25 min here)")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "COUNT", "SHAPES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), Path(args.child[2]))), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        shapes_file = Path(tmp) / "shapes.json"
        shapes_file.write_text(json.dumps(model_shapes(args.model)))
        print(f"# {platform.machine()}, {args.model}; peak = VmHWM - RSS after imports, per process")
        print(f"{'method':<7} {'replies':>7} {'parameters':>12} {'model MB':>9} {'seconds':>8} {'CPU s':>7} {'peak MB':>9} "
              f"{'peak/model':>10}")
        rows = []
        for method, counts in (("before", args.before), ("after", args.after)):
            for count in counts:
                done = subprocess.run([sys.executable, __file__, "--child", method, str(count), str(shapes_file)],
                                      capture_output=True, text=True, cwd=REPO)
                if done.returncode != 0:
                    raise SystemExit(f"{method} with {count} replies failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{method:<7} {count:>7} {row['parameters']:>12,} {row['model_mb_fp32']:>9} {row['seconds']:>8} {row['cpu_s']:>7} "
                      f"{row['peak_mb']:>9} {row['peak_mb'] / row['model_mb_fp32']:>10.2f}", flush=True)
    before = sorted((r["replies"], r["peak_mb"]) for r in rows if r["method"] == "before")
    if len(before) >= 2:
        (k0, m0), (k1, m1) = before[0], before[-1]
        slope = (m1 - m0) / (k1 - k0)
        print(f"before: +{slope:.0f} MB per reply => ~{(m0 + slope * (100 - k0)) / 1024:.1f} GB at 100 replies (extrapolated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
