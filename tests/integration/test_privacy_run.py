"""A real cross-silo run with client-level DP on: `fedasr federate` in its own process, Flower simulation on Ray,
the tiny model on the synthetic corpus, 2 rounds. Checks what a user of the DP setting relies on: epsilon is in
every round's row and the summary and is the accountant's value for the run's settings, every client's update
arrived clipped (by Flower's fixedclipping_mod on the client; the server only measures it), noise was added, and
the frozen feature-normaliser statistics came through untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedasr.fl.privacy import dp_epsilon
from fedasr.models.checkpoint import load_model_state

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

CLIP, NOISE, DELTA = 0.1, 0.05, 1e-4


def test_dp_cross_silo_run_clips_noises_and_reports_epsilon(cross_silo_partition, central_seed_checkpoint, tmp_path):
    out = tmp_path / "dp_run"
    settings = ["rounds=2", "local_epochs=1", "lr=0.1", "client_optimizer.name=sgd", "strategy.name=fedavg", "evaluation.test_decoding=greedy",
                "evaluation.dev_max_utterances=10", "privacy.enabled=true", f"privacy.clipping_norm={CLIP}",
                f"privacy.noise_multiplier={NOISE}", f"privacy.delta={DELTA}"]
    command = [str(BIN / "fedasr"), "federate", str(REPO / "hparams/fl/cross_silo.yaml"), "--partition",
               str(cross_silo_partition), "--seed-checkpoint", str(central_seed_checkpoint), "--output-dir", str(out)]
    command += [f"--set={item}" for item in settings]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr_home"), "OMP_NUM_THREADS": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        # 4 silos, all sampled: q = 1, so epsilon is that of `round` Gaussian releases of noise multiplier NOISE.
        assert row["dp_epsilon"] == pytest.approx(dp_epsilon(NOISE, row["round"], 1.0, DELTA))
        assert row["dp_relation"] == "add-or-remove-one"  # no sampling: the add-or-remove-one figure
        assert row["dp_noise_std"] == pytest.approx(NOISE * CLIP / 4)
        # Local SGD moves the model by more than CLIP (about 0.5-1 here): every update arrived clipped to CLIP.
        assert row["dp_clipped_fraction"] == 1.0
        assert row["dp_max_update_norm"] <= CLIP * (1 + 1e-3)  # float32 rounding of x + clipped update
        assert row["weights"] == [0.25] * 4  # DP aggregates with uniform weights
    assert rows[1]["dp_epsilon"] < rows[2]["dp_epsilon"] == summary["dp_epsilon"]
    assert summary["dp_delta"] == DELTA and summary["finished"]

    # The frozen normaliser statistics came through untouched; the rest moved by more than clipped updates can move
    # it (2 rounds of averages of updates of norm <= CLIP: <= 2 * CLIP), so the noise was added: its std
    # NOISE * CLIP / 4 = 1.25e-3 on ~0.45 M parameters has a norm of about 0.8 per round.
    seed_state = load_model_state(central_seed_checkpoint)
    final = torch.load(out / "final_model.pt", map_location="cpu")["state_dict"]
    frozen = [k for k in final if k.endswith(("glob_mean", "glob_std"))]
    assert frozen, "the model has no normaliser statistics to check"
    assert all(torch.equal(final[k], seed_state[k]) for k in frozen)
    moved = sum(float(((final[k].double() - seed_state[k].double()) ** 2).sum())
                for k in final if torch.is_floating_point(final[k]) and k not in frozen) ** 0.5
    assert moved > 3 * CLIP
