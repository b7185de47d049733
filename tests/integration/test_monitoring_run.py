"""Monitoring of real runs (issue 15, section 4): a 2-round `fedasr federate` run, stopped after round 1 and resumed,
has TensorBoard steps 0, 1, 2 (round 0 = the seed), each once; its console (what the pipeline keeps as
federate.log) has each round's line once and none of Flower's DEBUG lines, which are in the run's log.txt. The
central fixture model (`train-central`) has TensorBoard steps = epochs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_federated import REPO, TINY, federate_command, run_env

pytestmark = pytest.mark.slow
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROUND_LINE = re.compile(r"round (\d+)/(\d+): dev WER")


def scalar_steps(folder: Path) -> dict[str, list[int]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_federated_tensorboard_steps_are_rounds_and_each_round_is_logged_once(
        cross_silo_partition, central_seed_checkpoint, tmp_path):
    out = tmp_path / "run"
    console = tmp_path / "federate.log"  # as the pipeline keeps it: stdout and stderr of `fedasr federate`
    settings = [item if not item.endswith("rounds=3") else "--set=rounds=2" for item in TINY]
    with open(console, "w", encoding="utf-8") as log:
        for extra in (["--stop-after-round", "1"], ["--resume"]):
            done = subprocess.run(federate_command(cross_silo_partition, central_seed_checkpoint, out, *settings, *extra),
                                  env={**run_env(tmp_path), "FEDASR_ENERGY": "0"}, cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=600)
            assert done.returncode == 0, console.read_text()[-4000:]
    text = console.read_text()
    rounds = [int(m.group(1)) for m in ROUND_LINE.finditer(text)]
    assert rounds == [0, 1, 2], text[-4000:]  # each round's line once, across the stop and the resume
    assert "DEBUG" not in text and "alembic" not in text and "configure_train" not in text, text[-4000:]
    full = (out / "log.txt").read_text()
    assert "DEBUG flwr" in full and "configure_train" in full  # the detail is in the run's log file
    assert [int(m.group(1)) for m in ROUND_LINE.finditer(full)] == [0, 1, 2]
    steps = scalar_steps(out / "tensorboard")
    assert steps["WER/valid"] == [0, 1, 2], steps
    assert steps["loss/train"] == [1, 2] and steps["lr"] == [0, 1, 2]
    assert steps["WER/test"] == [0, 2]  # the seed and the last round are tested
    assert (out / "train_log.txt").read_text().count("round:") == 3


def test_central_tensorboard_steps_are_epochs(central_seed_checkpoint):
    import json

    run = central_seed_checkpoint.parent
    epochs = json.loads((run / "result.json").read_text())["epochs"]
    steps = scalar_steps(run / "tensorboard")
    assert steps["WER/valid"] == list(range(1, epochs + 1)), steps  # the fixture may train on (resume): no repeats
    assert steps["loss/train"] == list(range(1, epochs + 1))
    assert steps["WER/test"] and set(steps["WER/test"]) <= set(steps["WER/valid"])  # at the epoch tested
