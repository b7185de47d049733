"""The client optimizer setting (fl hparams `client_optimizer`), from the YAML through the round config to the
optimizer a client's local training builds; the published configuration (hparams/fl/paper.yaml); a recipe's
settings fitted to a small partition."""

import pytest
import torch

from fedasr.pipeline import fit_to_partition
from fedasr.fl.config import FLConfigError, load_fl_config
from fedasr.fl.run import FederatedRun
from fedasr.models.system import client_optimizer


def test_defaults_train_clients_with_adam_and_the_paper_file_with_plain_sgd():
    default, paper = load_fl_config("hparams/fl/cross_silo.yaml"), load_fl_config("hparams/fl/paper.yaml")
    assert (default.client_optimizer.name, default.strategy["temperature"]) == ("adam", 1.0)
    assert (paper.client_optimizer.name, paper.client_optimizer.momentum, paper.strategy["temperature"]) == ("sgd", 0.0, 1.0)
    assert paper.strategy["name"] == "wer-softmax" and paper.wer_source == "server" and paper.annealing.enabled


@pytest.mark.parametrize("settings, message", [
    ({"name": "rmsprop"}, "client_optimizer.name must be one of"),
    ({"name": "adam", "momentum": 0.9}, "applies to sgd only"),
    ({"name": "sgd", "momentum": 1.0}, r"must lie in \[0, 1\)"),
    ({"nmae": "sgd"}, "nmae"),
])
def test_bad_client_optimizer_settings_are_refused_naming_the_key(settings, message):
    with pytest.raises(FLConfigError, match=message):
        load_fl_config("hparams/fl/cross_silo.yaml", {"client_optimizer": settings})


def test_the_round_config_carries_the_optimizer_to_the_clients():
    config = load_fl_config("hparams/fl/cross_silo.yaml", {"client_optimizer": {"name": "sgd", "momentum": 0.9}})
    run = FederatedRun(config=config, seed_checkpoint="s", partition="p", output_dir="o", dev_manifest="d", num_clients=2)
    sent = run.round_config(3, lr=0.05)
    assert (sent["optimizer"], sent["momentum"], sent["lr"]) == ("sgd", 0.9, 0.05)


def test_client_optimizer_builds_the_named_torch_optimizer_with_a_fresh_state():
    params = [torch.nn.Parameter(torch.ones(3))]
    sgd = client_optimizer("sgd", lr=0.1, momentum=0.9)(params)
    adam = client_optimizer("adam", lr=0.001)(params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 0.001 and not adam.state
    with pytest.raises(ValueError, match="sgd or adam"):
        client_optimizer("lbfgs", lr=1.0)


def test_a_recipe_fits_clients_per_round_to_a_small_partition_with_a_note():
    device = load_fl_config("hparams/fl/cross_device.yaml")  # 20 speaker-clients per round
    fitted, notes = fit_to_partition(device, num_clients=5)
    assert fitted == {"clients_per_round": 5} and "20 -> 5" in notes[0]
    assert fit_to_partition(device, num_clients=2000) == ({}, [])
    assert fit_to_partition(load_fl_config("hparams/fl/cross_silo.yaml"), num_clients=2) == ({}, [])


def test_federate_refuses_more_clients_per_round_than_the_partition_holds_before_ray(tmp_path):
    from fedasr.data.manifest import Utterance, manifest_path, write_manifest
    from fedasr.data.partition import partition_manifest
    from fedasr.fl.simulation import resolve_run

    utterances = [Utterance(f"s{s}_{k}", 2.0, f"/clips/s{s}_{k}.mp3", f"{s:0128x}", "le chat dort")
                  for s in range(8) for k in range(4)]
    write_manifest(manifest_path(tmp_path, "train"), utterances)
    partition_manifest(tmp_path, tmp_path / "part", mode="cross-device", warmup_speakers=2, seed=0)
    with pytest.raises(FLConfigError, match="clients_per_round is 20 but the partition .* holds 6 clients"):
        resolve_run("hparams/fl/cross_device.yaml", partition=tmp_path / "part", seed_checkpoint=tmp_path / "seed",
                    output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
