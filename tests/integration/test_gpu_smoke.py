"""bench/gpu_smoke.sh (issue 14), kept working on a machine without a GPU: its --cpu-dry-run runs every stage (the
recipe's, then 50 client fits in one process, then test decoding) on the CPU and writes gpu_smoke.json; without a GPU
and without the flag it refuses at once, naming what it found."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "bench" / "gpu_smoke.sh"
FEDERATED_STAGES = ("silos", "speakers")


def smoke(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SMOKE), *args], env={**os.environ, "PYTHON": sys.executable}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def strict_json(path: Path) -> dict:
    """The file as strict JSON: NaN or Infinity (which Python's json writes by default) is an error."""
    def refuse(constant: str):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without a GPU")
def test_without_a_gpu_it_exits_2_at_once_naming_what_it_found(tmp_path):
    out = tmp_path / "smoke"
    started = time.perf_counter()
    proc = smoke(str(out), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_smoke: no usable GPU, nothing run." in proc.stderr
    assert "CUDA GPU(s) visible" in proc.stderr and f"torch {torch.__version__}" in proc.stderr
    assert "--cpu-dry-run" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and time.perf_counter() - started < 60  # one interpreter with torch; nothing else ran


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the smoke's corpus is spoken by espeak-ng")
def test_cpu_dry_run_reports_every_stage_on_the_cpu_as_strict_json(tmp_path):
    out = tmp_path / "smoke"
    proc = smoke("--cpu-dry-run", str(out), timeout=600)  # ~70 s on 2 cores
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = strict_json(out / "gpu_smoke.json")

    assert report["requested"] == {"device": "cpu", "precision": "fp32"}
    assert report["gpu"] is None and report["visible_gpus"] == 0 and report["torch"] == torch.__version__
    assert all(stage["gpu_peak_mib"] is None for stage in report["stages"].values())  # no nvidia-smi: null, not NaN
    assert report["central"]["device"] == "cpu" and report["central"]["train_audio_s_per_s"] > 0
    for name in FEDERATED_STAGES:
        stage = report[name]
        assert stage["server_device"] == "cpu" and stage["clients_device"].startswith("cpu (0/")
        assert stage["client_num_gpus"] == 0  # what the stage ran with (its fl_config.json)
        assert stage["train_audio_s_per_s"] > 0 and stage["per_client_fit_audio_s_per_s"] > 0
        assert stage["decode_audio_s_per_s"] > 0
    assert report["test"]["device"] == "cpu" and report["test"]["decode_audio_s_per_s"] > 0

    clients = report["clients50"]
    assert clients["device"] == "cpu" and clients["clients"] == 50 and len(clients["fits"]) == 50
    assert [fit["client"] for fit in clients["fits"]] == list(range(1, 51))
    assert {fit["partition_id"] for fit in clients["fits"]} == set(range(clients["speaker_clients"]))
    assert all(fit["examples"] > 0 and fit["rss_mib"] > 0 and fit["allocated_mib"] is None for fit in clients["fits"])
    assert clients["train_audio_s_per_s"] > 0 and clients["after_last_mib"] > 0
    # No client leaves memory behind for the next: after the allocator's warm-up (~8 clients) the process stays flat
    # (0.6 MiB over 40 clients here); keeping each client's model, gradients and Adam state would add ~240 MiB.
    assert clients["growth_since_tenth_mib"] < 40
    assert clients == strict_json(out / "clients50" / "memory.json")

    assert "clients50" in proc.stdout and "memory across 50 clients" in proc.stdout
    assert "client_num_gpus: silos 0.0, speakers 0.0" in proc.stdout
