"""Cost of secure aggregation (SecAgg+) against the plain weighted average, per round, as clients and model grow.

One process runs the whole protocol as fedasr does in a run (fedasr.fl.secure.secure_weighted_average: Flower's
SecAggPlusWorkflow on the server; secure_aggregation_mod -> secaggplus_mod -> weighted_update_reply on each
client, through the tests' InProcessGrid, tests/unit/fl_fakes.py), on random updates shaped like a real model's
floating-point state (``--model``, built from hparams/models/<model>.yaml) or a flat vector (``--params N``). Per setting it prints:
  - seconds of the whole protocol (all clients' work + the server's, one core: a real deployment runs the
    clients in parallel, so the client part divides by the number of machines) against the plain streamed
    weighted average of the same updates;
  - bytes the clients' replies carried (keys, shares, masked vectors) against the fp32 updates a plain round sends;
  - the largest error of the secure average against the plain one, in quantization steps (2 x clipping_range /
    quantization_range).

    .venv/bin/python bench/secure_aggregation_bench.py                        # crdnn_tiny, 4/10/20 clients; 10 M x 10
    .venv/bin/python bench/secure_aggregation_bench.py --params 50000000 --clients 10   # a larger model
    .venv/bin/python bench/secure_aggregation_bench.py --clients 20 50 --num-shares 5 --threshold 3 --also-flat 0
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests" / "unit"))  # fl_fakes.InProcessGrid: SecAgg+ clients in this process


def updates_for(shapes, clients: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Client updates of SGD-like size (std 1e-3, a few values near 0.05), float32 like the model."""
    rng = np.random.default_rng(seed)
    return [{key: (rng.standard_normal(shape) * 1e-3).astype(np.float32) for key, shape in shapes}
            for _ in range(clients)]


def measure(shapes, clients: int, settings) -> dict:
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedasr.fl.arrays import numpy_to_arrayrecord, weighted_average
    from fedasr.fl.secure import keep_update, secure_weighted_average
    from fl_fakes import InProcessGrid

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):  # what a ServerApp's messages carry
        setattr(TaskIdentity, name, value)
    updates = updates_for(shapes, clients, seed=clients)
    weights = np.random.default_rng(0).dirichlet(np.ones(clients))
    zero = {key: np.zeros(shape, np.float32) for key, shape in shapes}
    contexts = {}
    for node, update in enumerate(updates, start=1):
        contexts[node] = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
        keep_update(contexts[node], numpy_to_arrayrecord(update), numpy_to_arrayrecord(zero))
    started = time.perf_counter()
    plain = weighted_average(updates, weights)
    plain_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = secure_weighted_average(InProcessGrid(contexts), dict(zip(contexts, weights)), list(zero), 1, settings,
                                     timeout=None)
    secure_seconds = time.perf_counter() - started
    step = 2 * settings.clipping_range / settings.quantization_range
    error = max(float(np.abs(result.average[k] - plain[k]).max()) for k in plain if plain[k].size) / step
    params = sum(int(np.prod(shape)) for _, shape in shapes)
    return {"clients": clients, "params": params, "plain_s": plain_seconds, "secure_s": secure_seconds,
            "fp32_bytes": 4 * params * clients, "secure_bytes": result.bytes_received, "error_steps": error,
            "failed": len(result.failed)}


def _int_or_float(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="crdnn_tiny", help="hparams/models/<model>.yaml (shapes of its state)")
    parser.add_argument("--params", type=int, default=0, help="a flat vector of this many parameters instead")
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 10, 20])
    parser.add_argument("--also-flat", type=int, default=10_000_000,
                        help="with the default model, also a flat vector of this size at 10 clients (0: skip)")
    parser.add_argument("--num-shares", type=_int_or_float, default=1.0,
                        help="SecAgg+ num_shares: int > 2 (shares per client) or float share of the clients")
    parser.add_argument("--threshold", type=_int_or_float, default=0.5, help="SecAgg+ reconstruction_threshold")
    args = parser.parse_args()

    from fedasr.fl.config import SecureAggregation

    settings = SecureAggregation(enabled=True, num_shares=args.num_shares, reconstruction_threshold=args.threshold)
    runs = []
    if args.params:
        runs += [([("flat", (args.params,))], n, f"flat {args.params:,}") for n in args.clients]
    else:
        from aggregation_bench import model_shapes

        shapes = [(key, tuple(shape)) for key, shape in model_shapes(args.model)]
        runs += [(shapes, n, args.model) for n in args.clients]
        if args.also_flat:
            runs.append(([("flat", (args.also_flat,))], 10, f"flat {args.also_flat:,}"))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, Python {platform.python_version()}; SecAgg+ num_shares "
          f"{settings.num_shares} (all), threshold {settings.reconstruction_threshold}, clipping "
          f"{settings.clipping_range}, 2^{int(np.log2(settings.quantization_range))} levels, one process")
    print("| model | params | clients | plain average s | SecAgg+ s (all clients + server) | per client s "
          "| fp32 update MB | SecAgg+ reply MB | error (steps) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shapes, clients, label in runs:
        r = measure(shapes, clients, settings)
        print(f"| {label} | {r['params']:,} | {clients} | {r['plain_s']:.3f} | {r['secure_s']:.2f} | "
              f"{r['secure_s'] / clients:.2f} | {r['fp32_bytes'] / 1e6:.1f} | {r['secure_bytes'] / 1e6:.1f} | "
              f"{r['error_steps']:.2f} |", flush=True)
        assert r["failed"] == 0, r


if __name__ == "__main__":
    main()
