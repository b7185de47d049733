"""recipes/CommonVoice/<lang>/run.sh on a real (synthetic, Common-Voice-shaped) folder: the data stages run in
order, a re-run skips finished stages, changed settings redo the stage, and a later stage refuses to start
before the earlier ones are done. (The training stages are exercised end to end by test_demo.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "CommonVoice" / "fr" / "run.sh"
SMALL = ["--set", "partition.warmup_speakers=4", "--set", "partition.cross_silo_clients=2"]


def recipe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDASR": str(REPO / ".venv" / "bin" / "fedasr"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(RECIPE), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_recipe_runs_skips_and_resumes_stages(synth_corpus: Path, tmp_path: Path):
    out = tmp_path / "cv_fr"
    first = recipe(str(synth_corpus), "--out", str(out), "--stop-stage", "prepare", *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[2/8] prepare: running" in first.stdout and "partition" not in first.stdout
    assert (out / "manifests" / "train.csv").exists() and not (out / "partitions").exists()

    resumed = recipe(str(synth_corpus), "--out", str(out), "--stop-stage", "partition", *SMALL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[2/8] prepare: done before, skipped" in resumed.stdout
    assert "[3/8] partition: finished" in resumed.stdout
    silo = json.loads((out / "partitions" / "cross-silo" / "partition.json").read_text())
    assert len(silo["clients"]) == 2
    assert (out / "partitions" / "cross-device" / "partition.json").exists()

    again = recipe(str(synth_corpus), "--out", str(out), "--stop-stage", "partition", *SMALL)
    assert again.stdout.count("done before, skipped") == 3  # synth (the given folder), prepare, partition

    changed = recipe(str(synth_corpus), "--out", str(out), "--stop-stage", "partition",
                     "--set", "partition.warmup_speakers=4", "--set", "partition.cross_silo_clients=3")
    assert "[2/8] prepare: done before, skipped" in changed.stdout and "[3/8] partition: finished" in changed.stdout
    assert len(json.loads((out / "partitions" / "cross-silo" / "partition.json").read_text())["clients"]) == 3


def test_recipe_needs_the_corpus_and_finished_earlier_stages(tmp_path: Path):
    usage = recipe()
    assert usage.returncode == 2 and "usage:" in usage.stderr
    early = recipe(str(tmp_path), "--out", str(tmp_path / "out"), "--stage", "central")
    assert early.returncode == 2
    assert "stage 'synth' is not done" in early.stderr and "--stage synth" in early.stderr
    missing = recipe(str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "Common Voice folder not found" in missing.stderr


@pytest.mark.parametrize("lang", ["fr", "it", "en", "de", "es"])
def test_every_language_has_a_thin_recipe_with_its_hparams(lang):
    script = REPO / "recipes" / "CommonVoice" / lang / "run.sh"
    assert os.access(script, os.X_OK)
    assert f"run_recipe.sh\" {lang} " in script.read_text()
    assert (REPO / "hparams" / "CommonVoice" / f"{lang}.yaml").exists()
