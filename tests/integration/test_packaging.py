"""fedasr installed from its wheel, outside the repository: the wheel carries the recipes' YAMLs (hparams/) and
the pipeline runs from them (``fedasr demo OUT --stop-stage partition``), so `pip install fedasr` is enough."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_ships_the_yamls_and_runs_the_pipeline_outside_the_repository(tmp_path: Path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "wheel").glob("fedasr-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"fedasr/hparams/{p.relative_to(REPO / 'hparams').as_posix()}" for p in (REPO / "hparams").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert any(name.endswith("/LICENSE") for name in names)

    site = tmp_path / "site"  # a pure-Python wheel installed = unpacked onto the path
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import fedasr; print(fedasr.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(site)), where  # the wheel's copy, not the checkout's
    small = {"corpus.speakers": 12, "corpus.utterances_per_speaker": 4, "corpus.eval_speakers": 2,
             "corpus.eval_utterances_per_speaker": 4, "partition.warmup_speakers": 3, "partition.cross_silo_clients": 2}
    args = [item for key, value in small.items() for item in ("--set", f"{key}={value}")]
    done = subprocess.run([sys.executable, "-m", "fedasr.cli", "demo", "out", "--stop-stage", "partition", *args],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    partition = json.loads((work / "out" / "partitions" / "cross-silo" / "partition.json").read_text())
    assert len(partition["clients"]) == 2
    assert (work / "out" / "manifests" / "train.csv").stat().st_size > 0
