"""`flwr run .` as a Flower user types it: the app of pyproject.toml on a local simulation SuperLink that `flwr` starts
itself, with Flower's default of 2 SuperNodes for the fixture's 4 silos (fewer SuperNodes than clients: the server
maps the silos onto the nodes there are, nothing waits). The run folder must be what `fedasr federate` leaves, so
`fedasr compare` accepts it.

`flwr run` starts a detached `flower-superlink` (its own session, so it outlives `flwr`): the test gives it ports of
its own and a private FLWR_HOME, and stops it, and everything it started, by process id afterwards (the processes
whose environment holds this test's FLWR_HOME).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.integration.test_federated import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def flower_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    if (Path(sysconfig.get_paths()["purelib"]) / "fedasr-flower-defaults.pth").exists():
        env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)  # scripts/setup.sh's default must do it
    else:
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # a venv not made by scripts/setup.sh
    if importlib.util.find_spec("codecarbon") is not None:
        env["FEDASR_ENERGY"] = "1"  # energy.json, as `fedasr federate` writes it
    return env


def processes_of(home: Path) -> list[int]:
    """Ids of the live processes started under this FLWR_HOME (the SuperLink and what it started)."""
    marker = f"FLWR_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_processes(home: Path) -> None:
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        pids = processes_of(home)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.5)
            pids = processes_of(home)
        if not pids:
            return


@pytest.mark.timeout(600)
def test_flwr_run_with_fewer_supernodes_than_silos_leaves_a_federate_run_folder(
        cross_silo_partition, central_seed_checkpoint, tmp_path):
    home = tmp_path / "flwr_home"
    home.mkdir()
    # Flower's own local simulation connection; no num-supernodes: Flower's default of 2 for the 4 silos.
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    env = flower_env(home)
    out = tmp_path / "flwr_run"
    run_config = tmp_path / "run_config.toml"
    run_config.write_text("\n".join([  # absolute fixture paths; dev and test default to the partition's source
        f'partition = "{cross_silo_partition}"', f'seed-checkpoint = "{central_seed_checkpoint}"',
        f'output-dir = "{out}"', "num-server-rounds = 2",
        "overrides = '" + json.dumps({"local_epochs": 1, "lr": 0.002, "batch_size": 4,
                                      "evaluation": {"server_wer_utterances": 8, "test_decoding": "greedy"}}) + "'",
    ]) + "\n")
    try:
        done = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "--run-config", str(run_config), "--stream"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    finally:
        stop_processes(home)
    log = done.stdout[-4000:] + done.stderr[-3000:]
    assert done.returncode == 0, log
    assert (out / "summary.json").exists(), log
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["finished"] and [r["round"] for r in rows] == [0, 1, 2]
    assert all(sorted(r["clients"]) == [0, 1, 2, 3] and r["failed"] == [] for r in rows[1:])  # 4 silos on 2 nodes
    resolved = json.loads((out / "fl_config.json").read_text())
    assert resolved["num_clients"] == 4 and resolved["config"]["rounds"] == 2
    assert resolved["dev_manifest"].endswith("dev.csv")
    if env.get("FEDASR_ENERGY") == "1":
        assert (out / "energy.json").exists()
    assert not list((home / "runtime-envs").glob("*")) if (home / "runtime-envs").exists() else True
    compared = subprocess.run([str(BIN / "fedasr"), "compare", str(out), "--out", str(tmp_path / "report")],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert compared.returncode == 0, compared.stdout[-2000:] + compared.stderr[-2000:]
    assert (tmp_path / "report" / "compare.json").exists()
