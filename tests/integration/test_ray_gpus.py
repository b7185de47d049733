"""What fedasr's simulation relies on from Ray on a GPU machine, checked on a CPU one.

- On logical GPUs (``ray.init(num_gpus=2)``: Ray assigns GPU ids without any CUDA): a client with ``client_num_gpus``
  0 sees no GPU (its CUDA_VISIBLE_DEVICES is empty, so device auto trains it on the CPU), and one with a share sees
  only the GPU Ray gave it (so ``cuda`` there is that GPU).
- DataLoader workers (what ``num_workers: auto`` gives on a GPU) forked inside Ray's client workers and inside the
  driver, where the server decodes: a federated run with them is the run without them, to the digit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedasr.fl.simulation import _ENVIRONMENT

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, ray

@ray.remote
class Client:
    def visible(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES"), [str(i) for i in ray.get_gpu_ids()]

ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
seen = {str(share): ray.get(Client.options(num_cpus=0.1, num_gpus=share).remote().visible.remote())
        for share in (0, 0.5, 1)}
print(json.dumps(seen))
ray.shutdown()
"""


def test_a_client_without_a_gpu_share_sees_no_gpu_and_one_with_a_share_sees_only_its_own():
    env = {**os.environ, **_ENVIRONMENT}  # as run_simulation_for sets them before Ray starts
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["0"] == ["", []]  # no share: no GPU visible
    for share in ("0.5", "1"):
        visible, assigned = seen[share]
        assert len(assigned) == 1 and visible == assigned[0]  # exactly the GPU Ray assigned


@pytest.mark.slow
def test_loader_workers_inside_ray_clients_and_the_server_change_nothing(cross_silo_partition, central_seed_checkpoint,
                                                                          tmp_path):
    from fedasr.fl.metrics_log import read_metrics_rows

    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        done = subprocess.run(
            [str(Path(sys.executable).parent / "fedasr"), "federate", str(REPO / "hparams/fl/cross_silo.yaml"),
             "--partition", str(cross_silo_partition), "--seed-checkpoint", str(central_seed_checkpoint),
             "--output-dir", str(out), "--set", "rounds=1", "--set", "local_epochs=1", "--set", "batch_size=4",
             "--set", "evaluation.server_wer_utterances=8", "--set", "evaluation.test_decoding=greedy",
             "--set", f"system_overrides.num_workers={workers}"],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[workers] = [{k: v for k, v in row.items() if k != "seconds" and "fit_seconds" not in k}
                         for row in read_metrics_rows(out / "metrics.jsonl")]
    assert len(runs[2]) == 2 and runs[2] == runs[0]
