"""Deployment security and faults, with real processes on loopback: a SuperLink serving TLS with certificates from
scripts/make_certificates.sh and SuperNode authentication on (`--enable-supernode-auth`, keys registered with
`flwr supernode register`).

- the certificate script: idempotent, private keys 0600, SAN as asked, --force to remake;
- SuperNodes without a registered key, or that do not trust the deployment's CA, are refused and never listed;
- two authorized SuperNodes run fedasr over TLS, and the run survives two SIGKILLs:
  1. SuperNode 1, while it trains in round 1. What "the run continues" means with fedasr's server loop: the
     SuperLink answers the killed node's message with a NODE_UNAVAILABLE error once its heartbeats stop (2 x 30 s
     in Flower 1.42), so round 1 completes with the other silo and records the drop; the SuperNode is restarted
     with the same key and partition id, comes back under its old node id (the id belongs to the registered key),
     and round 2, which waits for every silo (min_available_nodes = num-clients), trains it again.
     A SuperNode restarted while the SuperLink still counts the old one online is refused by Flower ("Failed to
     activate SuperNode"), so the test (like an operator's restart loop) restarts it once round 1 has closed.
  2. The ServerApp process, while round 2 trains: the run is stopped (`flwr stop`) and submitted again with
     resume = true; it continues after round 1 (rows 0-1 of metrics.jsonl untouched) and finishes round 2 with
     both silos. Not compared with an uninterrupted deployment run (another ~2 min of CI); the bit-exact
     comparison of a resumed run is test_federated.py::test_killed_after_round_two_and_resumed_matches.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

REGISTERED = (0, 1)  # key pairs registered with the SuperLink; supernode-2 is made but never registered


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SecureLink:
    """A running TLS + authenticated SuperLink and what a SuperNode or `flwr` needs to talk to it."""

    env: dict
    port: int
    certs: Path
    workdir: Path
    node_ids: dict  # key index -> node id given by `flwr supernode register`

    def supernode_command(self, partition_id: int, key: int | None, *, trust_ca: bool = True) -> list[str]:
        command = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                   "--node-config", f"partition-id={partition_id} num-partitions={len(REGISTERED)}"]
        if trust_ca:
            command += ["--root-certificates", str(self.certs / "ca.crt")]
        if key is not None:
            command += ["--auth-supernode-private-key", str(self.certs / "supernodes" / f"supernode-{key}")]
        return command

    def start(self, command: list[str], log_name: str) -> subprocess.Popen:
        """A process in its own session (so its children, SuperExec and ClientApps, go with it), logged to a file."""
        with open(self.workdir / log_name, "ab") as log:
            return subprocess.Popen(command, env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=timeout)

    def nodes(self) -> dict[int, str]:
        """node id -> status, as `flwr supernode list` reports them."""
        done = self.flwr("supernode", "list", "deploy", "--format", "json")
        assert done.returncode == 0, done.stdout + done.stderr
        return {int(n["node-id"]): n["status"] for n in json.loads(done.stdout)["nodes"]}


def stop(process: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """Signal the process's whole session (it was started in its own), then reap it; SIGKILL what lingers."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children (ServerApp, SuperExec, ClientApp) may outlive the leader
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def secure_link(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("secure_link")
    certs = workdir / "certs"
    made = make_certificates(certs, "--supernodes", "3")
    assert made.returncode == 0, made.stderr
    port = free_port()
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(workdir / "flwr_home"), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    (workdir / "flwr_home").mkdir()
    (workdir / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    link = SecureLink(env=env, port=port, certs=certs, workdir=workdir, node_ids={})
    superlink = link.start(
        [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile",
         str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
         "--disable-runtime-dependency-installation", "--port", str(port), "--database", ":flwr-in-memory:"],
        "superlink.log")
    try:
        deadline = time.time() + 60
        while b"Uvicorn running on https://" not in (workdir / "superlink.log").read_bytes():
            assert superlink.poll() is None and time.time() < deadline, (workdir / "superlink.log").read_text()[-3000:]
            time.sleep(0.2)
        for key in REGISTERED:
            done = link.flwr("supernode", "register", str(certs / "supernodes" / f"supernode-{key}.pub"), "deploy",
                             "--format", "json")
            assert done.returncode == 0, done.stdout + done.stderr
            link.node_ids[key] = int(json.loads(done.stdout)["node-id"])
        yield link
    finally:
        stop(superlink)
        for pid in processes(b"", marker=str(workdir).encode()):  # e.g. a ServerApp outlives its SuperLink
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def make_certificates(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts/make_certificates.sh"), str(out), *args], capture_output=True,
                          text=True, timeout=60)


def test_make_certificates_is_idempotent_and_keeps_keys_private(tmp_path):
    out = tmp_path / "certs"
    assert make_certificates(out, "fl.example.org", "10.1.2.3").returncode == 0
    files = sorted(p for p in out.rglob("*") if p.is_file())
    private = [out / "ca.key", out / "server.key", out / "supernodes/supernode-0", out / "supernodes/supernode-1"]
    assert all(p in files for p in private) and not list(out.glob(".tmp*"))
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in private)
    san = subprocess.run(["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True, check=True).stdout
    assert all(name in san for name in ("127.0.0.1", "localhost", "fl.example.org", "10.1.2.3"))
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    before = {p: p.read_bytes() for p in files}
    assert make_certificates(out, "fl.example.org", "10.1.2.3").returncode == 0
    assert {p: p.read_bytes() for p in files} == before  # a second run changes nothing
    other_host = make_certificates(out, "other.example.org")
    assert other_host.returncode != 0 and "--force" in other_host.stderr
    assert {p: p.read_bytes() for p in files} == before
    assert make_certificates(out, "other.example.org", "--force").returncode == 0
    assert all(p.read_bytes() != before[p] for p in private)


def test_unregistered_or_untrusting_supernodes_are_refused(secure_link):
    link = secure_link
    attempts = {
        "no key": (link.supernode_command(0, None), "All SuperNodes must be registered via the CLI"),
        "unregistered key": (link.supernode_command(0, 2), "Failed to activate SuperNode"),
        "does not trust the CA": (link.supernode_command(0, 0, trust_ca=False), "CERTIFICATE_VERIFY_FAILED"),
    }
    started = {name: link.start(command, f"refused-{i}.log") for i, (name, (command, _)) in enumerate(attempts.items())}
    try:
        for name, process in started.items():
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the SuperNode with {name} was not refused within 120 s")
    finally:
        for process in started.values():
            stop(process)
    for i, (name, (_, message)) in enumerate(attempts.items()):
        log = (link.workdir / f"refused-{i}.log").read_text()
        assert started[name].returncode != 0 and message in log, f"{name}: {log[-2000:]}"
    assert set(link.nodes()) == set(link.node_ids.values())  # only the registered keys are known to the SuperLink


def run_config_file(path: Path, out: Path, partition: Path, seed: Path, manifests: Path, resume=False) -> Path:
    """The run config of a 2-silo, 2-round run of 1 local epoch, small server-side evaluations."""
    overrides = {"local_epochs": 1, "lr": 0.1, "client_optimizer": {"name": "sgd"},
                 "evaluation": {"server_wer_utterances": 4, "dev_max_utterances": 8, "test_decoding": "greedy"}}
    path.write_text("\n".join([
        f'hparams = "{REPO / "hparams/fl/cross_silo.yaml"}"', f'partition = "{partition}"',
        f'seed-checkpoint = "{seed}"', f'output-dir = "{out}"', f'dev-manifest = "{manifests / "dev.csv"}"',
        "num-clients = 2", "num-server-rounds = 2", f"resume = {str(resume).lower()}",
        f"overrides = '{json.dumps(overrides)}'",
    ]) + "\n")
    return path


def processes(program: bytes, *, session: int | None = None, marker: bytes = b"") -> list[int]:
    """Pids running ``program`` whose command line holds ``marker`` and, if given, that belong to ``session``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if program not in cmdline or marker not in cmdline:
                continue
            if session is None or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3]) == session:
                pids.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def rounds_logged(metrics: Path) -> list[int]:
    return [json.loads(line)["round"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def wait_until(condition, timeout: float, what: str, watched: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert watched.poll() is None, f"`flwr run` ended while waiting for {what}"
        assert time.time() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


def test_tls_run_survives_a_killed_supernode_and_a_killed_serverapp(secure_link, cross_silo_partition,
                                                                     central_seed_checkpoint, prepared_manifests):
    link = secure_link
    out = link.workdir / "run"
    metrics = out / "metrics.jsonl"
    config = run_config_file(link.workdir / "run_config.toml", out, cross_silo_partition, central_seed_checkpoint,
                             prepared_manifests)
    resume_config = run_config_file(link.workdir / "resume_config.toml", out, cross_silo_partition,
                                    central_seed_checkpoint, prepared_manifests, resume=True)
    submit = [str(BIN / "flwr"), "run", str(REPO), "deploy", "--stream", "--run-config"]
    nodes = {pid: link.start(link.supernode_command(pid, pid), f"supernode-{pid}.log") for pid in REGISTERED}
    first = link.start(submit + [str(config)], "flwr-run.log")
    resumed = None
    try:
        # 1. SuperNode 1 is SIGKILLed while it trains in round 1, restarted once round 1 has closed without it.
        training = lambda: processes(b"flwr-clientapp", session=nodes[1].pid)  # noqa: E731  (a ClientApp runs)
        wait_until(training, 300, "silo 1 training in round 1", first)
        stop(nodes[1], signal.SIGKILL)
        wait_until(lambda: 1 in rounds_logged(metrics), 200, "round 1 closing without silo 1", first)
        nodes[1] = link.start(link.supernode_command(1, 1), "supernode-1.log")
        # 2. The ServerApp process is SIGKILLed while the restarted SuperNode trains in round 2; the operator stops
        #    the dead run and submits it again with resume=true.
        wait_until(training, 300, "silo 1 training in round 2", first)
        serverapps = processes(b"flwr-serverapp", marker=str(link.certs).encode())  # its --root-certificates
        assert len(serverapps) == 1
        os.kill(serverapps[0], signal.SIGKILL)
        before_kill = metrics.read_text().splitlines()
        run_id = (link.workdir / "flwr-run.log").read_text().split("Successfully started run ")[1].split()[0]
        stopped = link.flwr("stop", run_id, "deploy")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        stop(first)
        resumed = link.start(submit + [str(resume_config)], "flwr-run-resumed.log")
        resumed.wait(timeout=400)
        log = (link.workdir / "flwr-run-resumed.log").read_text()
        assert resumed.returncode == 0, log[-4000:]
        listed = link.nodes()
    finally:
        for process in [first, resumed, *nodes.values()]:
            if process is not None:
                stop(process)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and [r["round"] for r in rows] == [0, 1, 2]
    assert [r["round"] for r in map(json.loads, before_kill)] == [0, 1]
    assert metrics.read_text().splitlines()[:2] == before_kill  # resumed after round 1, which is not redone
    assert rows[1]["clients"] == [0] and len(rows[1]["dropped"]) == 1
    dropped, reason = rows[1]["dropped"][0]
    assert dropped in (1, link.node_ids[1]) and "Node Unavailable" in reason  # silo 1 (partition id or node id)
    assert rows[2]["clients"] == [0, 1]  # the restarted SuperNode trained again, under its registered node id
    assert listed == {link.node_ids[0]: "online", link.node_ids[1]: "online"}
