"""Shared test set-up: quiet, single-threaded process defaults and a small real corpus built once per session.

Fixtures (all session-scoped, built lazily the first time a test asks for them):

- ``synth_corpus``: a Common-Voice-shaped folder spoken by espeak-ng voices (:data:`FIXTURE_CORPUS`: 20 speakers
  x 12 clips; 14 train / 3 dev / 3 test speakers).
- ``prepared_manifests``: ``train.csv``, ``dev.csv``, ``test.csv`` made from it by ``prepare_common_voice``.
- ``cross_silo_partition``: :data:`FIXTURE_WARMUP_SPEAKERS` warm-up speakers + :data:`FIXTURE_SILOS` silos.
- ``cross_device_partition``: the same warm-up speakers + one client per remaining train speaker.
- ``central_seed_checkpoint``: the tiny model after :data:`FIXTURE_SEED_EPOCHS` epochs on all train speakers.

The partition fixtures return the partition folder; ``fedasr.data.partition.load_partition(path)`` reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# 20 speakers, not 16: with 2 dev voices the dev WER of the partly trained fixture model swung between 0.56 and 1.26
# with the seed and the machine (one hard voice dominates); 3 dev voices track the test set (bench/RESULTS.md).
FIXTURE_CORPUS = {"lang": "fr", "speakers": 20, "utterances_per_speaker": 12, "seed": 0}
FIXTURE_WARMUP_SPEAKERS = 4
FIXTURE_SILOS = 4
FIXTURE_SEED_EPOCHS = 6
# The fixture model is trained on until its dev WER is below this (2 epochs at a time, at most FIXTURE_MAX_EPOCHS):
# past the point where the attention decoder starts to spell words, wherever the machine's kernels put it.
FIXTURE_SEED_MAX_DEV_WER = 0.75
FIXTURE_MAX_EPOCHS = 12

TEST_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray binds 127.0.0.1 only
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "FEDASR_ENERGY": "0",  # no codecarbon tracker per training run (tests/unit/test_compare.py and the demo test measure)
}


def pytest_configure(config: pytest.Config) -> None:
    """Process defaults for every test: no telemetry or network look-ups, one compute thread."""
    for name, value in TEST_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        import torch
    except ImportError:  # the data-only tests do not need torch
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedasr.data.synth import synthesize_corpus

    out = tmp_path_factory.mktemp("synth") / "cv_fr"
    synthesize_corpus(out, **FIXTURE_CORPUS)
    return out


@pytest.fixture(scope="session")
def prepared_manifests(synth_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedasr.data.commonvoice import prepare_common_voice

    out = tmp_path_factory.mktemp("manifests")
    prepare_common_voice(synth_corpus, out, lang=FIXTURE_CORPUS["lang"], workers=1)
    return out


@pytest.fixture(scope="session")
def cross_silo_partition(prepared_manifests: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedasr.data.partition import partition_manifest

    out = tmp_path_factory.mktemp("cross_silo")
    partition_manifest(
        prepared_manifests, out, mode="cross-silo", clients=FIXTURE_SILOS,
        warmup_speakers=FIXTURE_WARMUP_SPEAKERS, seed=0,
    )
    return out


@pytest.fixture(scope="session")
def cross_device_partition(prepared_manifests: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedasr.data.partition import partition_manifest

    out = tmp_path_factory.mktemp("cross_device")
    partition_manifest(
        prepared_manifests, out, mode="cross-device", warmup_speakers=FIXTURE_WARMUP_SPEAKERS, seed=0
    )
    return out


@pytest.fixture(scope="session")
def central_seed_checkpoint(prepared_manifests: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seed checkpoint of the tiny model trained centrally on all train speakers for :data:`FIXTURE_SEED_EPOCHS`
    epochs: a model that decodes but is far from converged, so federated tests can assert that the rounds lower
    the global dev WER. Its quality differs with the machine (CPU kernels) and the seed: the federated tests use
    settings that improve it wherever it lands (the default Adam client; plain SGD at lr 0.5 made a good seed worse)
    and judge the round chosen by dev WER, as a user gets it in best_model.pt. Its quality is pinned from one side:
    where 6 epochs leave the decoder still at its take-off (dev WER 0.86 for one model seed where others reach
    0.61-0.65; federated rounds then improve it slowly), training goes on, 2 epochs at a time (the Checkpointer
    resumes), until the dev WER is below :data:`FIXTURE_SEED_MAX_DEV_WER`.
    """
    from fedasr.models.train import train_central

    out = tmp_path_factory.mktemp("central_seed")
    repo = Path(__file__).resolve().parents[1]
    epochs = FIXTURE_SEED_EPOCHS
    while True:
        result = train_central(repo / "hparams" / "CommonVoice" / "synth.yaml",
                               [f"--manifest_folder={prepared_manifests}", f"--output_folder={out}",
                                f"--number_of_epochs={epochs}"])
        if result["dev_wer"] < FIXTURE_SEED_MAX_DEV_WER or epochs >= FIXTURE_MAX_EPOCHS:
            break
        epochs += 2
    assert result["dev_wer"] < FIXTURE_SEED_MAX_DEV_WER, (
        f"the fixture seed model still has dev WER {result['dev_wer']:.3f} after {epochs} epochs: every federated "
        "test would start from a model that cannot decode yet")
    return Path(result["seed_checkpoint"])
