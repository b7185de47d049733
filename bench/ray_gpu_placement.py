"""Where Ray places simulated clients that ask for a fraction of a GPU, and which GPUs a round's first jobs land on.

Flower's simulation (BasicActorPool) creates GPUs / client_num_gpus actors, each asking Ray for client_num_gpus of a
GPU, and hands each job to the idle actor at the end of its list. This script asks Ray the same on logical GPUs
(``ray.init(num_gpus=8)``: Ray assigns GPU ids without any CUDA, so it runs on a CPU machine), reads each actor's
``ray.get_gpu_ids()``, and prints, per share, how many actors each GPU holds and the most clients one GPU gets when a
round's 10 or 20 jobs go to the actors in Flower's order. It is the measured basis of bench/full_table_plan.py's
first-fit model and of fedasr.pipeline.client_gpu_share.

    .venv/bin/python bench/ray_gpu_placement.py [--gpus 8] [--jobs 10 20]
"""

from __future__ import annotations

import argparse
import collections
import os

SHARES = (1.0, 0.5, 0.3333, 0.25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="logical GPUs Ray is given (default 8)")
    parser.add_argument("--jobs", type=int, nargs="+", default=[10, 20], help="jobs of a round (default 10 20)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    @ray.remote
    class Probe:
        def gpu_ids(self):
            return tuple(ray.get_gpu_ids())

    ray.init(num_cpus=2, num_gpus=args.gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    print(f"ray {ray.__version__}, {args.gpus} logical GPUs; jobs go to actors from the end of the list (Flower)")
    try:
        for share in SHARES:
            count = int(args.gpus / share + 1e-9)
            actors = [Probe.options(num_cpus=0.01, num_gpus=share).remote() for _ in range(count)]
            ids = ray.get([actor.gpu_ids.remote() for actor in actors])
            held = collections.Counter(gpu for assigned in ids for gpu in assigned)
            parts = [f"client_num_gpus {share:g}: {count} actors, {sorted(set(held.values()))} per GPU"]
            for jobs in args.jobs:
                load = collections.Counter(gpu for assigned in ids[::-1][:jobs] for gpu in assigned)
                parts.append(f"{jobs} jobs: up to {max(load.values())} on one GPU, {len(load)} GPUs used")
            print("; ".join(parts), flush=True)
            for actor in actors:
                ray.kill(actor)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
