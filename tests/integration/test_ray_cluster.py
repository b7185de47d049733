"""The simulation on a multi-node Ray cluster: a head and a worker node started with `ray start` on loopback.

The head offers no CPU, so every client must run on the worker node: a finished round proves that `fedasr
federate` joined the cluster (``ray_address``) instead of starting its own Ray, and that the per-client resources
of the fl hparams (``client_num_cpus``) size the parallel clients on that node. Both nodes run with ``--block``
and are stopped through those processes (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env() -> dict:
    env = dict(os.environ)
    # "1": multi-node allowed (this variable at "0", which fedasr sets for its own loopback Ray, forbids any cluster)
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    env.pop("RAY_ADDRESS", None)
    return env


def wait_for_nodes(address: str, count: int, env: dict, timeout: float = 120.0) -> None:
    """Until the cluster at ``address`` has ``count`` live nodes (ray.nodes() from a short-lived driver)."""
    probe = ("import ray, sys; ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = subprocess.run([sys.executable, "-c", probe, address], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray cluster at {address} did not reach {count} nodes: {done.stderr[-2000:]}")


@pytest.fixture
def loopback_cluster():
    """(address, [head, worker] processes): head with 0 CPUs, one worker node with 2 CPUs, both on 127.0.0.1."""
    env = ray_env()
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    nodes = [subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0", "--num-gpus=0",
                               "--include-dashboard=false", f"--temp-dir={temp_dir}", *common],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        time.sleep(3)
        nodes.append(subprocess.Popen([str(BIN / "ray"), "start", f"--address={address}", "--num-cpus=2",
                                       "--num-gpus=0", *common], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        wait_for_nodes(address, 2, env)
        yield address, nodes
    finally:
        for node in reversed(nodes):  # SIGTERM to `ray start --block` stops that node's own Ray processes
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in reversed(nodes):
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)  # its own session: only what this fixture started
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_simulation_runs_its_clients_on_the_worker_node_of_a_cluster(cross_silo_partition, central_seed_checkpoint,
                                                                     loopback_cluster, tmp_path):
    from fedasr.data.partition import load_partition

    address, nodes = loopback_cluster
    out = tmp_path / "cluster_run"
    command = [str(BIN / "fedasr"), "federate", str(REPO / "hparams/fl/cross_silo.yaml"),
               "--partition", str(cross_silo_partition), "--seed-checkpoint", str(central_seed_checkpoint),
               "--output-dir", str(out)]
    for item in ("rounds=1", "local_epochs=1", f"ray_address={address}", "client_num_cpus=1",
                 "evaluation.server_wer_utterances=4", "evaluation.dev_max_utterances=8",
                 "evaluation.test_decoding=greedy"):
        command += ["--set", item]
    done = subprocess.run(command, env={**ray_env(), "FLWR_HOME": str(tmp_path / "flwr")}, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert all(node.poll() is None for node in nodes), "a Ray node died during the run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clients = len(load_partition(cross_silo_partition)["clients"])
    assert rows[-1]["round"] == 1 and len(rows[-1]["clients"]) == clients  # every silo trained, on the worker node
    assert rows[-1]["train_num_examples"] > 0
    resolved = json.loads((out / "fl_config.json").read_text())["config"]
    assert resolved["ray_address"] == address and resolved["client_num_cpus"] == 1


def test_backend_config_joins_a_cluster_or_starts_a_loopback_ray(monkeypatch):
    from fedasr.fl.config import config_from_dict
    from fedasr.fl.simulation import backend_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = backend_config(config_from_dict({"client_num_cpus": 0.5, "client_num_gpus": 0.25}))
    assert local["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert local["init_args"]["_node_ip_address"] == "127.0.0.1" and "address" not in local["init_args"]
    joined = backend_config(config_from_dict({"ray_address": "10.0.0.5:6379"}))
    assert joined["init_args"] == {"address": "10.0.0.5:6379", "include_dashboard": False}  # Ray forbids num_cpus here
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:7000")
    assert backend_config(config_from_dict({}))["init_args"]["address"] == "127.0.0.1:7000"
