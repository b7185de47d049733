"""A real federated run with secure aggregation (SecAgg+ through Flower's simulation on Ray): the global model it
makes equals, up to SecAgg+'s quantization, the one a plain run makes from the same seed and clients, and no
client reply carries arrays in the clear."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from test_federated import REPO, federate_command, read_rows, run_env

pytestmark = pytest.mark.slow

# One round, one local epoch; loss-softmax at T = 0.1 so the clients' weights differ (the fixture silos' local WERs
# are equal); dev WER on 8 utterances, no per-client scoring on the server.
ONE_ROUND = [f"--set={item}" for item in ("rounds=1", "local_epochs=1", "lr=0.5", "client_optimizer.name=sgd", "strategy.name=loss-softmax",
                                          "strategy.temperature=0.1", "evaluation.dev_max_utterances=8",
                                          "evaluation.test_decoding=greedy")]


def federate(partition: Path, seed: Path, out: Path, *extra: str) -> Path:
    done = subprocess.run(federate_command(partition, seed, out, *ONE_ROUND, *extra), env=run_env(out), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def final_arrays(out: Path) -> dict[str, np.ndarray]:
    state = torch.load(out / "final_model.pt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v.numpy() for k, v in state.items() if v.is_floating_point()}


def test_secure_aggregation_run_equals_the_plain_run(cross_silo_partition, central_seed_checkpoint, tmp_path):
    plain = federate(cross_silo_partition, central_seed_checkpoint, tmp_path / "plain")
    secure = federate(cross_silo_partition, central_seed_checkpoint, tmp_path / "secure",
                      "--set=secure_aggregation.enabled=true")
    plain_row, secure_row = read_rows(plain)[1], read_rows(secure)[1]
    # Every silo took part: a training reply with arrays in the clear would have been dropped as unusable.
    assert secure_row["clients"] == plain_row["clients"] == [0, 1, 2, 3] and secure_row["failed"] == []
    assert not secure_row["round_skipped"] and secure_row["train_num_clients"] == 4
    # The same weights, and they differ between clients (so the check below is not a plain mean).
    np.testing.assert_allclose(secure_row["weights"], plain_row["weights"], rtol=1e-9)
    assert max(secure_row["weights"]) - min(secure_row["weights"]) > 0.01, secure_row["weights"]
    # What travelled back: masked integer vectors and key shares instead of fp32 models.
    assert secure_row["bytes_received"] > plain_row["bytes_received"]
    # The global model: equal up to SecAgg+'s quantization (2^22 levels over [-8, 8], each client's weighted value
    # off by < 1 step, 4 clients, weights summing to 1) plus fp32 rounding.
    plain_model, secure_model = final_arrays(plain), final_arrays(secure)
    bound = 4 * 16 / 2**22 + 1e-5
    worst = max(float(np.abs(plain_model[k] - secure_model[k]).max()) for k in plain_model)
    assert worst < bound, worst
