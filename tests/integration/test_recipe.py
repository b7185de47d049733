"""recipes/CommonVoice/<lang>/run.sh on a real (synthetic, Common-Voice-shaped) folder: the data stages run in
order, a re-run skips finished stages, changed settings redo the stage, and a later stage refuses to start
before the earlier ones are done. (The training stages are exercised end to end by test_demo.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "CommonVoice" / "fr" / "run.sh"
SMALL = ["--set", "partition.warmup_speakers=4", "--set", "partition.cross_silo_clients=2"]


def recipe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDASR": str(REPO / ".venv" / "bin" / "fedasr"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(RECIPE), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def stamps(out: Path) -> dict[str, int]:
    """Modification times (ns) of what the data stages write: unchanged means the stage was skipped."""
    files = {"manifest": out / "manifests" / "train.csv", "silo": out / "partitions" / "cross-silo" / "partition.json",
             "device": out / "partitions" / "cross-device" / "partition.json"}
    return {name: path.stat().st_mtime_ns for name, path in files.items() if path.exists()}


def silo_clients(out: Path) -> int:
    return len(json.loads((out / "partitions" / "cross-silo" / "partition.json").read_text())["clients"])


@pytest.mark.slow
def test_recipe_runs_skips_and_resumes_stages(synth_corpus: Path, tmp_path: Path):
    out = tmp_path / "cv_fr"
    first = recipe(str(synth_corpus), "--out", str(out), "--stop-stage", "prepare", *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    assert set(stamps(out)) == {"manifest"}  # stopped after prepare: no partition yet
    prepared = stamps(out)["manifest"]

    resumed = recipe(str(synth_corpus), "--out", str(out), "--stop-stage", "partition", *SMALL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after_partition = stamps(out)
    assert after_partition["manifest"] == prepared  # prepare was done: not redone
    assert silo_clients(out) == 2
    device = json.loads((out / "partitions" / "cross-device" / "partition.json").read_text())
    assert all(len(client["speakers"]) == 1 for client in device["clients"])  # cross-device: a speaker a client

    again = recipe(str(synth_corpus), "--out", str(out), "--stop-stage", "partition", *SMALL)
    assert again.returncode == 0 and stamps(out) == after_partition  # everything done: nothing rewritten

    changed = recipe(str(synth_corpus), "--out", str(out), "--stop-stage", "partition",
                     "--set", "partition.warmup_speakers=4", "--set", "partition.cross_silo_clients=3")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert stamps(out)["manifest"] == prepared and stamps(out)["silo"] != after_partition["silo"]  # only partition
    assert silo_clients(out) == 3


def test_recipe_needs_the_corpus_and_finished_earlier_stages(tmp_path: Path):
    usage = recipe()
    assert usage.returncode == 2 and "usage:" in usage.stderr
    early = recipe(str(tmp_path), "--out", str(tmp_path / "out"), "--stage", "central")
    assert early.returncode == 2
    assert "stage 'synth' is not done" in early.stderr and "--stage synth" in early.stderr
    missing = recipe(str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "Common Voice folder not found" in missing.stderr


@pytest.mark.parametrize("lang", ["fr", "it", "en", "de", "es"])
def test_every_language_recipe_runs_with_its_own_settings(lang, tmp_path: Path):
    """Each thin run.sh reaches the pipeline with its language: the settings it resolves (pipeline.yaml) name that
    language, and its experiment YAML is the language's own, composed with the recipe's model."""
    from fedasr.models.hparams import compose_yaml

    out = tmp_path / lang
    corpus = tmp_path / "cv"  # the synth stage only checks the folder is there
    corpus.mkdir()
    done = subprocess.run(["bash", str(REPO / "recipes" / "CommonVoice" / lang / "run.sh"), str(corpus), "--out",
                           str(out), "--stop-stage", "synth"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FEDASR": str(REPO / ".venv" / "bin" / "fedasr")})
    assert done.returncode == 0, done.stderr[-3000:]
    settings = yaml.safe_load((out / "pipeline.yaml").read_text())
    assert settings["language"] == lang and settings["dataset"] == "CommonVoice"
    experiment = REPO / settings["experiment"].format(language=lang)
    assert experiment == REPO / "hparams" / "CommonVoice" / f"{lang}.yaml"
    text, model = compose_yaml(experiment, settings["model"])
    assert model == settings["model"] and f"\nlanguage: {lang}\n" in f"\n{text}"
