"""Fast screening of federated client settings, in one process and without Flower or Ray.

The same local training (SpeechBrainASRSystem.fit) and the same weighted average (fedasr.fl.arrays) as a
federated run, clients trained one after the other on one core: a setting can be tried on a seed checkpoint and
a partition in a minute or two, two at a time on a 2-core machine. What it leaves out: the server-side scoring
of wer-softmax (weights are the clients' example shares, i.e. FedAvg, which WER-softmax at T = 1 is within a few
points here), annealing, checkpoints. Settings found here are confirmed with real runs (bench/fl_quality.py).
Prints the global dev WER/CER per round and one JSON line (also appended to --results).

    .venv/bin/python bench/fl_screen.py --seed-checkpoint results/demo/runs/synth/fr/warmup/ctc_tiny/seed1234/seed_checkpoint \\
        --partition results/demo/partitions/cross-silo --dev results/demo/manifests/dev.csv \\
        --test results/demo/manifests/test.csv --optimizer adam --lr 0.002 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed-checkpoint", required=True)
    p.add_argument("--partition", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--optimizer", default="adam", choices=("sgd", "adam"))
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--clients-per-round", type=int, default=0, help="0: every client every round")
    p.add_argument("--dev-max-utterances", type=int, default=30, help="0: the whole dev set")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tag", default="")
    p.add_argument("--results", default=None, help="a JSON-lines file the result is appended to")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import numpy as np
    import torch

    from fedasr.data.partition import load_partition
    from fedasr.fl.arrays import weighted_average
    from fedasr.fl.strategies.metric_softmax import example_weights
    from fedasr.models.system import SpeechBrainASRSystem

    a = parse_args(argv)
    torch.set_num_threads(1)
    system = SpeechBrainASRSystem.from_checkpoint(a.seed_checkpoint)
    clients = load_partition(a.partition)["clients"]
    global_state = system.state_dict()
    trained_keys = [k for k, v in global_state.items()  # integer buffers and frozen statistics never travel
                    if v.is_floating_point() and not k.endswith(("glob_mean", "glob_std"))]

    def dev_scores() -> tuple[float, float]:
        result = system.evaluate(a.dev, decoding="greedy", max_utterances=a.dev_max_utterances or None)
        return result.wer, result.cer

    dev_wer, dev_cer = dev_scores()
    curve, cer_curve, best = [dev_wer], [dev_cer], (dev_wer, 0, dict(global_state))
    sampler = random.Random(a.seed)
    started = time.perf_counter()
    for server_round in range(1, a.rounds + 1):
        chosen = sorted(sampler.sample(range(len(clients)), a.clients_per_round)) if a.clients_per_round else range(len(clients))
        states, examples = [], []
        for cid in chosen:
            system.load_state_dict(global_state)
            fit = system.fit(clients[cid]["train"], epochs=a.local_epochs, lr=a.lr, batch_size=a.batch_size,
                             seed=a.seed * 1000 + server_round * 100 + cid, optimizer=a.optimizer, momentum=a.momentum)
            states.append({k: v.numpy() for k, v in system.state_dict().items() if k in trained_keys})
            examples.append(fit.num_examples)
        averaged = weighted_average(states, example_weights(examples))
        global_state = {**global_state, **{k: torch.from_numpy(np.asarray(v)) for k, v in averaged.items()}}
        system.load_state_dict(global_state)
        dev_wer, dev_cer = dev_scores()
        curve.append(dev_wer)
        cer_curve.append(dev_cer)
        if dev_wer < best[0]:
            best = (dev_wer, server_round, dict(global_state))
        print(f"round {server_round}: dev WER {dev_wer:.4f} CER {dev_cer:.4f} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    last_test = system.evaluate(a.test, decoding="greedy").wer
    system.load_state_dict(best[2])
    best_test = system.evaluate(a.test, decoding="greedy").wer
    out = {"tag": a.tag, "settings": vars(a), "dev_wer": curve, "dev_cer": cer_curve, "best_round": best[1],
           "test_wer_best": best_test, "test_wer_last": last_test, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(out))
    if a.results:
        with open(a.results, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
