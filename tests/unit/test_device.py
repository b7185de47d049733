"""Device plumbing (issue 14) on a CPU machine: one resolution of ``device`` for every stage, requests that cannot be
met refused at once with the device named, SpeechBrain's run options parsed, ``cpu`` reaching the models built, and
a client's training leaving nothing behind for the next client.

The GPU branch is tested as logic, with torch.cuda.is_available / device_count monkeypatched (nothing runs on a
GPU here; bench/gpu_smoke.sh exercises the GPU paths on a GPU machine). Each mocked test has a real CPU twin.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fedasr.cli import main as cli_main
from fedasr.utils import device as device_mod
from fedasr.utils.device import DeviceError, check_precision, resolve_device

REPO = Path(__file__).resolve().parents[2]
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without a GPU")


@pytest.fixture
def fake_gpus(monkeypatch):
    """``fake_gpus(n)``: torch reports n CUDA GPUs (logic tests only: nothing may be put on them)."""
    def set_count(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return set_count


# ---------------------------------------------------------------------------------------------- resolve_device


@needs_no_gpu
def test_auto_and_cpu_resolve_to_cpu_without_a_gpu():
    assert resolve_device("auto") == "cpu"
    assert resolve_device(None) == "cpu"  # no request = auto
    assert resolve_device("cpu") == "cpu" and resolve_device(" CPU ") == "cpu"


@needs_no_gpu
@pytest.mark.parametrize("request_", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_is_refused_without_a_gpu_naming_the_request_and_what_was_found(request_):
    with pytest.raises(DeviceError) as err:
        resolve_device(request_, what="device")
    message = str(err.value)
    assert repr(request_) in message and "0 CUDA GPU(s) visible" in message and torch.__version__ in message
    assert "Use device cpu" in message


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "cpu:0", "auto:1", "", "cuda:-1", "mps", "cuda0"])
def test_malformed_requests_are_refused_with_the_choices(bad):
    with pytest.raises(DeviceError, match=r"auto \| cpu \| cuda \| cuda:N"):
        resolve_device(bad)


def test_gpu_branch_logic(fake_gpus):
    fake_gpus(2)
    assert resolve_device("auto") == "cuda:0"
    assert resolve_device("cuda") == "cuda:0"  # the first visible GPU (in a Ray worker: the one Ray assigned)
    assert resolve_device("CUDA:1") == "cuda:1"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match=r"'cuda:3' names GPU 3 but only cuda:0..cuda:1 are visible"):
        resolve_device("cuda:3")
    fake_gpus(1)
    with pytest.raises(DeviceError, match=r"only cuda:0..cuda:0 are visible"):
        resolve_device("cuda:3")  # cuda:3 on a 1-GPU machine
    fake_gpus(0)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="asks for a CUDA GPU but none is usable"):
        resolve_device("cuda")


def test_precision_checks():
    assert check_precision("bf16", "cpu") == "bf16" and check_precision("FP32", "cpu") == "fp32"
    assert check_precision("fp16", "cuda:0") == "fp16"
    with pytest.raises(DeviceError, match="fp16 needs a CUDA device"):
        check_precision("fp16", "cpu")
    with pytest.raises(DeviceError, match="precision must be one of"):
        check_precision("fp8", "cuda:0")


def test_autocast_is_off_at_fp32_and_bf16_on_the_cpu():
    a = torch.randn(4, 4)
    with device_mod.autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
    with device_mod.autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    assert device_mod.peak_gpu_memory("cpu") is None
    device_mod.release_gpu_memory("cpu")  # a no-op on the CPU


# ---------------------------------------------------------------------------------------------- fl settings


def test_fl_device_and_precision_settings():
    from fedasr.fl.config import FLConfigError, config_from_dict, load_fl_config
    from fedasr.fl.run import FederatedRun

    config = load_fl_config(REPO / "hparams/fl/cross_silo.yaml")
    assert config.device == "auto" and config.precision == "fp32"
    assert config_from_dict({"device": " CUDA:1 "}).device == "cuda:1"  # syntax only: no GPU needed to load it
    with pytest.raises(FLConfigError, match=r"device must be one of auto \| cpu \| cuda \| cuda:N"):
        config_from_dict({"device": "gpu0"})
    with pytest.raises(FLConfigError, match="precision must be one of"):
        config_from_dict({"precision": "int8"})

    def fingerprint(settings):
        return FederatedRun(config=config_from_dict(settings), seed_checkpoint="seed", partition="p.json",
                            output_dir="out", dev_manifest="dev.csv", num_clients=2).fingerprint()["config"]

    # device is where a run computes: a run may resume on another; the default precision leaves the fingerprint of
    # runs checkpointed before these settings existed unchanged; another precision is another experiment.
    assert fingerprint({"device": "cpu"}) == fingerprint({"device": "cuda"}) == fingerprint({})
    assert '"device"' not in fingerprint({}) and '"precision"' not in fingerprint({})
    assert fingerprint({"precision": "bf16"}) != fingerprint({})


def test_round_config_carries_device_and_precision():
    from fedasr.fl.config import config_from_dict
    from fedasr.fl.protocol import DEVICE, PRECISION, round_config

    sent = round_config(config_from_dict({"device": "cuda:1", "precision": "bf16"}), server_round=1, lr=0.1,
                        seed_checkpoint="seed", partition="p.json")
    assert sent[DEVICE] == "cuda:1" and sent[PRECISION] == "bf16"


@needs_no_gpu
def test_simulation_device_checks_on_this_cpu_machine():
    from fedasr.fl.config import config_from_dict
    from fedasr.fl.simulation import check_simulation_devices

    assert check_simulation_devices(config_from_dict({}))[0] == "cpu"  # auto
    assert check_simulation_devices(config_from_dict({"device": "cpu"})) == ("cpu", "cpu")
    with pytest.raises(DeviceError, match="fl.yaml: device 'cuda' asks for a CUDA GPU"):
        check_simulation_devices(config_from_dict({"device": "cuda"}), source="fl.yaml")
    with pytest.raises(DeviceError, match="client_num_gpus is 0.25 but this machine has no usable GPU"):
        check_simulation_devices(config_from_dict({"client_num_gpus": 0.25}), source="fl.yaml")
    with pytest.raises(DeviceError, match="fp16 needs a CUDA device"):
        check_simulation_devices(config_from_dict({"precision": "fp16"}))


def test_simulation_device_logic_with_gpus(fake_gpus):
    from fedasr.fl.config import FLConfigError, config_from_dict
    from fedasr.fl.simulation import check_simulation_devices

    fake_gpus(1)
    server, clients = check_simulation_devices(config_from_dict({"device": "cuda", "client_num_gpus": 0.25}))
    assert server == "cuda:0" and "0.25 share of a GPU" in clients
    assert check_simulation_devices(config_from_dict({}))[0] == "cuda:0"  # auto: server on the GPU, clients on CPU
    with pytest.raises(FLConfigError, match="client_num_gpus is 0, so Ray would give the clients no GPU"):
        check_simulation_devices(config_from_dict({"device": "cuda"}))
    with pytest.raises(FLConfigError, match="GPU shares they do not use"):
        check_simulation_devices(config_from_dict({"device": "cpu", "client_num_gpus": 0.5}))
    with pytest.raises(DeviceError, match="only cuda:0..cuda:0 are visible"):
        check_simulation_devices(config_from_dict({"device": "cuda:3", "client_num_gpus": 0.25}))


def test_client_device_node_config_first_then_the_gpu_ray_assigned(fake_gpus):
    from fedasr.fl.client_app import client_device

    fake_gpus(1)  # a Ray worker with a GPU share sees exactly its GPU, as cuda:0
    assert client_device({}, {"device": "cuda:3"}) == "cuda:0"  # the server's index does not apply here
    assert client_device({}, {"device": "auto"}) == "cuda:0"
    assert client_device({}, {}) == "cuda:0"  # an older server: auto
    assert client_device({"device": "cpu"}, {"device": "cuda"}) == "cpu"  # a SuperNode's own setting wins
    with pytest.raises(DeviceError, match="SuperNode device"):
        client_device({"device": "cuda:1"}, {"device": "cpu"})
    fake_gpus(0)  # client_num_gpus 0: Ray hides the GPUs from the worker
    assert client_device({}, {"device": "auto"}) == "cpu"
    with pytest.raises(DeviceError, match="client device"):
        client_device({}, {"device": "cuda"})


# ---------------------------------------------------------------------------------------------- train-central


def test_speechbrain_run_options_parse():
    from fedasr.models.train import check_run_options, split_run_options

    given, rest = split_run_options(["--device=cuda:0", "--precision=bf16", "--noprogressbar", "--lr=0.5",
                                     "--number_of_epochs", "3", "--grad_accumulation_factor=2", "--max_grad_norm=2"])
    assert given == {"device": "cuda:0", "precision": "bf16", "noprogressbar": True, "grad_accumulation_factor": 2}
    assert rest == ["--lr=0.5", "--number_of_epochs", "3", "--max_grad_norm=2"]  # max_grad_norm: the YAML's key
    assert split_run_options(["--output_folder=o"]) == ({}, ["--output_folder=o"])
    with pytest.raises(ValueError, match="invalid choice: 'fp8'"):
        split_run_options(["--precision=fp8"])
    assert check_run_options({"precision": "bf16", "device": "cpu"}, "cpu") == {"precision": "bf16"}
    with pytest.raises(ValueError, match="--test_only is not supported by train-central"):
        check_run_options({"test_only": True}, "cpu")
    with pytest.raises(DeviceError, match="--precision fp16 needs a CUDA device"):
        check_run_options({"precision": "fp16"}, "cpu")


def cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli_main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@needs_no_gpu
@pytest.mark.parametrize("options", [["--device=cuda"], ["--device", "cuda:0"], ["--device=cuda:3"],
                                     ["--device=cpu", "--precision=fp16"]])
def test_cli_train_central_refuses_an_unusable_device_before_writing(options, tmp_path, capsys):
    out = tmp_path / "central"
    started = time.perf_counter()
    code, err = cli(["train-central", str(REPO / "hparams/CommonVoice/synth.yaml"), *options, "--model=ctc_tiny",
                     f"--output_folder={out}", f"--manifest_folder={tmp_path}"], capsys)
    assert code == 2 and not out.exists() and time.perf_counter() - started < 10
    assert ("asks for a CUDA GPU" in err and options[-1].split("=")[-1] in err) or "fp16 needs a CUDA device" in err


@needs_no_gpu
def test_cli_evaluate_refuses_an_unusable_device(tmp_path, capsys):
    code, err = cli(["evaluate", str(tmp_path / "ckpt"), str(tmp_path / "test.csv"), "--device", "cuda",
                     "--out", str(tmp_path / "ev")], capsys)
    assert code == 2 and "device 'cuda' asks for a CUDA GPU" in err and not (tmp_path / "ev").exists()


@needs_no_gpu
def test_cli_federate_with_device_cuda_exits_in_seconds_before_ray_with_nothing_written(tmp_path):
    """A real `fedasr federate` process on this CPU machine: refused before Ray starts, the output folder empty."""
    out = tmp_path / "fl"
    out.mkdir()
    (tmp_path / "partition").mkdir()
    (tmp_path / "seed").mkdir()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedasr.cli", "federate", str(REPO / "hparams/fl/cross_silo.yaml"),
                           "--partition", str(tmp_path / "partition"), "--seed-checkpoint", str(tmp_path / "seed"),
                           "--output-dir", str(out), "--set", "device=cuda"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    seconds = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    assert "fedasr federate: error:" in proc.stderr and "device 'cuda' asks for a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr and "ServerApp" not in proc.stderr
    assert list(out.iterdir()) == [] and seconds < 60  # interpreter + torch import; Ray never started


@needs_no_gpu
@pytest.mark.parametrize("override", ["device=cuda", "device=cuda:1", "precision=fp16",
                                      "cross_silo.set.device=cuda", "central_device=cuda:1"])
def test_pipeline_refuses_an_unusable_device_before_the_first_stage(override, tmp_path, capsys):
    out = tmp_path / "demo"
    started = time.perf_counter()
    code, err = cli(["demo", str(out), "--set", override], capsys)
    assert code == 2 and not out.exists() and time.perf_counter() - started < 20
    assert "asks for a CUDA GPU" in err or "fp16 needs a CUDA device" in err
    assert ("cross_silo.hparams" in err) == override.startswith("cross_silo")  # the section that asked is named


def test_pipeline_device_and_precision_reach_every_federated_stage_unless_a_section_sets_its_own(fake_gpus):
    from fedasr.pipeline import fl_settings, load_pipeline_config

    fake_gpus(0)
    config = load_pipeline_config(overrides={"precision": "bf16", "cross_device": {"set": {"precision": "fp32"}}})
    silo, notes = fl_settings(config, "cross_silo")
    assert (silo.device, silo.precision, silo.client_num_gpus, notes) == ("auto", "bf16", 0, [])
    assert fl_settings(config, "cross_device")[0].precision == "fp32"
    # With a GPU the simulated clients get a share of it (a logged note), unless the section chose its own.
    fake_gpus(1)
    silo, notes = fl_settings(config, "cross_silo")
    assert silo.client_num_gpus == 0.25 and "client_num_gpus 0 -> 0.25" in notes[0]
    config["cross_silo"]["set"] = {"client_num_gpus": 0}
    assert fl_settings(config, "cross_silo")[0].client_num_gpus == 0
    config["device"] = "cpu"
    assert fl_settings(config, "cross_device")[0].client_num_gpus == 0


@pytest.mark.parametrize("gpus, clients, share", [
    (1, 10, 0.25),    # ten silos on one GPU: four at a time at most
    (8, 10, 0.5),     # ten silos on eight GPUs: two per GPU at most (0.25 could stack four on one GPU)
    (8, 20, 0.3333),  # twenty speaker-clients on eight GPUs: three per GPU
    (8, 8, 1.0), (8, 3, 1.0), (1, 1, 1.0),
    (2, None, 0.25),  # clients not known yet (the pipeline's preflight): the most per GPU
])
def test_client_gpu_share_lets_a_round_train_at_once_with_the_fewest_clients_per_gpu(gpus, clients, share):
    from fedasr.pipeline import MAX_CLIENTS_PER_GPU, client_gpu_share

    assert client_gpu_share(gpus, clients) == share
    per_gpu = round(1 / share)
    assert per_gpu <= MAX_CLIENTS_PER_GPU
    if clients and per_gpu < MAX_CLIENTS_PER_GPU:
        assert gpus * per_gpu >= clients > gpus * (per_gpu - 1)  # all at once, and no fewer per GPU would do


def test_pipeline_shares_the_gpus_by_the_clients_a_round_trains_at_once(fake_gpus, monkeypatch):
    from fedasr.pipeline import fl_settings, load_pipeline_config

    config = load_pipeline_config(REPO / "hparams/pipeline/commonvoice.yaml")  # all silos a round; 20 speaker-clients
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    fake_gpus(8)
    silo, notes = fl_settings(config, "cross_silo", num_clients=10)
    assert silo.client_num_gpus == 0.5 and "client_num_gpus 0 -> 0.5 (device auto, 8 GPUs: up to 2 clients" in notes[0]
    assert fl_settings(config, "cross_device", num_clients=2000)[0].client_num_gpus == 0.3333
    monkeypatch.setattr("os.cpu_count", lambda: 16)  # Ray runs at most 16 one-CPU clients at once: two per GPU
    assert fl_settings(config, "cross_device", num_clients=2000)[0].client_num_gpus == 0.5
    fake_gpus(1)
    assert fl_settings(config, "cross_silo", num_clients=10)[0].client_num_gpus == 0.25
    fake_gpus(0)  # the CPU: no share (the real machine's case in the test above)
    assert fl_settings(config, "cross_silo", num_clients=10)[0].client_num_gpus == 0


def test_central_on_a_gpu_of_its_own_beside_stages_that_leave_it_alone(fake_gpus, monkeypatch):
    from fedasr import pipeline
    from fedasr.pipeline import load_pipeline_config

    recipe = REPO / "hparams/pipeline/commonvoice.yaml"
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake_gpus(8)
    config = load_pipeline_config(recipe, {"device": "cuda", "central_device": "cuda:7"})
    assert pipeline.central_beside_warmup(config)  # auto, on a GPU: beside because it has a GPU of its own
    assert pipeline.stage_device(config, "central") == "cuda:7" and pipeline.stage_device(config, "warmup") == "cuda"
    assert pipeline.federate_environment(config)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6"
    # The federated stages share out the 7 GPUs left: 10 silos -> 2 per GPU, 20 speaker-clients -> 3 per GPU.
    assert pipeline.fl_settings(config, "cross_silo", num_clients=10)[0].client_num_gpus == 0.5
    assert pipeline.fl_settings(config, "cross_device", num_clients=2000)[0].client_num_gpus == 0.3333
    # Without it every stage sees every GPU.
    plain = load_pipeline_config(recipe, {"device": "cuda"})
    assert "CUDA_VISIBLE_DEVICES" not in pipeline.federate_environment(plain)
    assert not pipeline.central_beside_warmup(plain) and pipeline.stage_device(plain, "central") == "cuda"
    # Ray's (or a scheduler's) CUDA_VISIBLE_DEVICES is kept, entries as given; cuda:N past the baseline's GPU shifts.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b,GPU-c")
    fake_gpus(3)
    config = load_pipeline_config(recipe, {"device": "cuda:2", "central_device": "cuda:1"})
    assert pipeline.federate_environment(config)["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-c"
    assert pipeline.fl_settings(config, "cross_silo", num_clients=10)[0].device == "cuda:1"  # GPU-c among the two
    # A section's own device is renumbered the same way.
    config = load_pipeline_config(recipe, {"device": "cuda:0", "central_device": "cuda:1",
                                           "cross_silo": {"set": {"device": "cuda:2"}}})
    assert pipeline.fl_settings(config, "cross_silo", num_clients=10)[0].device == "cuda:1"
    assert pipeline.fl_settings(config, "cross_device", num_clients=10)[0].device == "cuda:0"


@pytest.mark.parametrize("overrides, says", [
    ({"central_device": "cuda"}, "must name a GPU (cuda:N)"),
    ({"central_device": "cpu"}, "must name a GPU (cuda:N)"),
    ({"central_device": "cuda:0"}, "must be a GPU other than the other stages'"),
    ({"central_device": "cuda:1", "device": "cpu"}, "must be a GPU other than the other stages'"),
    ({"central_device": "cuda:2"}, "names GPU 2 but only cuda:0..cuda:1 are visible"),
    ({"central_device": "cuda:1", "central_beside_warmup": False}, "central_beside_warmup is false"),
    ({"central_device": "cuda:1", "central": {"init_from": "warmup"}}, "central.init_from is warmup"),
    ({"central_device": "cuda:1", "cross_silo": {"set": {"device": "cuda:1"}}},
     "other than the other stages' (cross_silo.set.device 'cuda:1'"),
    ({"central_device": "cuda:1", "cross_device": {"set": {"ray_address": "10.0.0.1:6379", "client_num_gpus": 0.5}}},
     "with cross_device on the Ray cluster at 10.0.0.1:6379"),
])
def test_central_device_requests_that_cannot_be_met_are_refused_when_the_config_loads(fake_gpus, monkeypatch,
                                                                                        overrides, says):
    from fedasr.pipeline import PipelineError, load_pipeline_config

    fake_gpus(2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(PipelineError, match=re.escape(says)):
        load_pipeline_config(REPO / "hparams/pipeline/commonvoice.yaml", {"device": "cuda", **overrides})


# ---------------------------------------------------------------------------------------------- models on the device


def _tiny_seed_and_manifest(root: Path, model_name: str) -> tuple[Path, Path]:
    """A seed checkpoint of ``model_name`` (tokenizer of 30 pieces) and a 4-utterance manifest of tones."""
    from fedasr.data.manifest import Utterance, write_manifest
    from fedasr.models.checkpoint import export_checkpoint
    from fedasr.models.hparams import load_experiment
    from fedasr.models.model import build_acoustic_model
    from fedasr.models.tokenizer import train_tokenizer

    sentences = ["le chat dort", "la pluie tombe", "un vent froid", "mon ami chante"]
    exp = load_experiment(REPO / "hparams/CommonVoice/synth.yaml",
                          [f"--output_folder={root}", f"--manifest_folder={root}", f"--model={model_name}"])
    model = build_acoustic_model(exp.hparams, source=model_name)
    model.train()
    model(torch.randn(2, 16000) * 0.1, torch.ones(2), epoch=1)  # the normaliser's statistics
    tokenizer = train_tokenizer(sentences * 10, root / "tok" / "tokenizer.model", vocab_size=30)
    meta = {"model": exp.model_name, "vocab_size": exp.hparams["vocab_size"], "tokenizer_vocab_size": tokenizer.vocab_size}
    seed = export_checkpoint(root / "seed_checkpoint", state_dict=model.state_dict(), tokenizer_path=tokenizer.model_path,
                             resolved_yaml=exp.resolved_yaml, meta=meta)
    rows = []
    for i, sentence in enumerate(sentences):
        t = np.arange(int(0.6 * 16000)) / 16000
        wav = root / f"{i}.wav"
        sf.write(wav, (0.2 * np.sin(2 * np.pi * (180 + 40 * i) * t)).astype("float32"), 16000)
        rows.append(Utterance(ID=f"u{i}", duration=0.6, wav=str(wav), spk_id=f"s{i % 2}", wrd=sentence))
    write_manifest(root / "train.csv", rows)
    return seed, root / "train.csv"


@pytest.fixture(scope="module")
def tiny_system_inputs(tmp_path_factory):
    """A ctc_tiny seed checkpoint and its 4-utterance manifest."""
    return _tiny_seed_and_manifest(tmp_path_factory.mktemp("device_system"), "ctc_tiny")


def test_a_system_with_an_attention_decoder_keeps_no_batch_after_training_or_decoding(tmp_path):
    """SpeechBrain's attention caches the last batch's encoder projection and mask until its next forward; on a
    GPU the server would hold the batch of a beam-search decode, a client the last batch of its training."""
    from fedasr.models.system import SpeechBrainASRSystem

    seed, manifest = _tiny_seed_and_manifest(tmp_path, "crdnn_tiny")
    system = SpeechBrainASRSystem.from_checkpoint(seed, device="cpu")
    attention = system.model.roles["decoder"].attn

    def cached():
        return [name for name in ("precomputed_enc_h", "mask", "prev_attn") if getattr(attention, name, None) is not None]

    system.fit(manifest, epochs=1, lr=0.05, batch_size=2, seed=1, optimizer="adam")
    assert cached() == []
    assert system.evaluate(manifest, decoding="beam").num_utterances == 4
    assert cached() == []


def test_crdnn_trains_and_decodes_at_bf16_with_its_lstms_in_fp32(tmp_path):
    """What keep_rnns_in_fp32 does to a bf16 system on CUDA, done on the CPU: SpeechBrain's LSTM wrapper (packed
    sequences, flattened weights) runs the swapped modules; training and beam search work, weights stay fp32."""
    from fedasr.models.rnn_precision import LSTMInFp32, rnns_run_in_fp32
    from fedasr.models.system import SpeechBrainASRSystem

    seed, manifest = _tiny_seed_and_manifest(tmp_path, "crdnn_tiny")
    system = SpeechBrainASRSystem.from_checkpoint(seed, device="cpu", precision="bf16")
    assert rnns_run_in_fp32(system.model) >= 1
    assert any(isinstance(m, LSTMInFp32) for m in system.model.modules())
    result = system.fit(manifest, epochs=1, lr=0.05, batch_size=2, seed=1, optimizer="adam")
    assert result.train_loss == result.train_loss  # finite
    assert {v.dtype for v in system.state_dict().values() if v.is_floating_point()} == {torch.float32}
    assert system.evaluate(manifest, decoding="beam").num_utterances == 4


def test_cpu_reaches_the_model_and_a_fit_leaves_nothing_for_the_next_client(tiny_system_inputs):
    from fedasr.models.system import SpeechBrainASRSystem

    seed, manifest = tiny_system_inputs
    system = SpeechBrainASRSystem.from_checkpoint(seed, device="cpu")
    assert system.device == "cpu" and system.precision == "fp32"
    assert {p.device.type for p in system.model.parameters()} | {b.device.type for b in system.model.buffers()} == {"cpu"}
    start = system.state_dict()
    fit = dict(epochs=1, lr=0.05, batch_size=2, optimizer="adam")
    system.fit(manifest, seed=1, **fit)
    assert all(p.grad is None for p in system.model.parameters())  # gradients released with the Brain
    assert all(v.device.type == "cpu" for v in system.state_dict().values())
    # A second client on the same worker trains exactly as it would on a fresh one: nothing of the first remains.
    system.load_state_dict(start)
    second = system.fit(manifest, seed=2, **fit)
    after_reuse = system.state_dict()
    fresh = SpeechBrainASRSystem.from_checkpoint(seed, device="auto")  # auto = cpu on this machine
    assert fresh.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    alone = fresh.fit(manifest, seed=2, **fit)
    assert second.train_loss == alone.train_loss
    assert all(torch.equal(after_reuse[k], v) for k, v in fresh.state_dict().items())
    result = system.evaluate(manifest, decoding="greedy")
    assert result.num_utterances == 4


@needs_no_gpu
def test_system_refuses_cuda_before_reading_the_checkpoint(tmp_path):
    from fedasr.models.system import SpeechBrainASRSystem

    with pytest.raises(DeviceError, match="'cuda'"):
        SpeechBrainASRSystem.from_checkpoint(tmp_path / "missing", device="cuda")
    with pytest.raises(DeviceError, match="fp16 needs a CUDA device"):
        SpeechBrainASRSystem.from_checkpoint(tmp_path / "missing", device="cpu", precision="fp16")


def test_a_client_out_of_gpu_memory_fails_its_reply_with_the_fix(monkeypatch):
    """Logic (no GPU here): a CUDA out-of-memory error in a client's fit becomes the reply's error reason (what
    metrics.jsonl lists under `failed`), naming the client, the device and the settings that free memory. The real
    fit path on the CPU is the federated tests'."""
    from fedasr.fl import client_app

    class OutOfMemory:
        def fit(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79 GiB total)")

    class Cached:
        system = OutOfMemory()

        def load_global(self, arrays):
            pass

    monkeypatch.setattr(client_app, "client_for", lambda partition, partition_id: {"train": "train.csv"})
    monkeypatch.setattr(client_app, "cached_system", lambda *args: Cached())
    from fedasr.fl import protocol as p

    config = {p.SYSTEM: "x:Y", p.SEED_CHECKPOINT: "seed", p.LOCAL_EPOCHS: 1, p.LR: 0.1, p.BATCH_SIZE: 8, p.SEED: 1,
              p.DEVICE: "cpu", p.PRECISION: "bf16"}
    with pytest.raises(RuntimeError) as raised:
        client_app.train_on_partition(None, config, "part", 3)
    message = str(raised.value)
    assert message.startswith("client 3: out of GPU memory on cpu (batch_size 8, precision bf16)")
    assert "client_num_gpus 0.5 or 1" in message and "Tried to allocate 2.00 GiB" in message


def test_client_builds_its_system_on_the_resolved_device(monkeypatch):
    """The ClientApp passes the resolved device (and a non-default precision) to the system it caches."""
    from fedasr.fl import client_app

    built = []

    class Recorder:
        @classmethod
        def from_checkpoint(cls, checkpoint_dir, overrides=None, device="cpu", **extra):
            built.append((device, extra))
            return cls()

        def state_dict(self):
            return {"w": torch.zeros(2)}

    monkeypatch.setattr(client_app, "import_system_class", lambda spec: Recorder)
    client_app.cached_system.cache_clear()
    try:
        client_app.cached_system("x:Y", "seed", "{}", "cpu", "fp32")
        client_app.cached_system("x:Y", "seed", "{}", "cpu", "fp32")  # cached
        client_app.cached_system("x:Y", "seed", "{}", "cpu", "bf16")  # another key: rebuilt
    finally:
        client_app.cached_system.cache_clear()
    assert built == [("cpu", {}), ("cpu", {"precision": "bf16"})]


def test_bf16_training_and_decoding_on_the_cpu_keep_fp32_weights(tiny_system_inputs):
    from fedasr.models.system import SpeechBrainASRSystem

    seed, manifest = tiny_system_inputs
    system = SpeechBrainASRSystem.from_checkpoint(seed, device="cpu", precision="bf16")
    result = system.fit(manifest, epochs=1, lr=0.05, batch_size=2, seed=1, optimizer="adam")
    assert result.train_loss == result.train_loss  # finite, not NaN
    state = system.state_dict()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}  # what travels stays fp32
    assert system.evaluate(manifest, decoding="greedy").num_utterances == 4
    assert system.evaluate(manifest, decoding="beam").num_utterances == 4  # CTC prefix beam search reads fp32 numpy


def test_rnns_run_in_fp32_under_autocast_with_the_same_parameters():
    """keep_rnns_in_fp32 (bf16 on CUDA: cuDNN would run the LSTMs in unscaled fp16) exercised on the CPU: under a
    bf16 autocast the changed LSTM computes in fp32, exactly as without autocast; its state dict and parameters
    are the module's own."""
    import copy

    from torch.nn.utils.rnn import pack_padded_sequence

    from fedasr.models.rnn_precision import LSTMInFp32, keep_rnns_in_fp32, rnns_run_in_fp32

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LSTM(8, 16, batch_first=True, bidirectional=True))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = model[1](model[0](x))[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model[1](model[0](x))[0].dtype == torch.bfloat16  # oneDNN's bf16 LSTM on the CPU
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]

    assert keep_rnns_in_fp32(model, "cpu", "bf16") == 0 and keep_rnns_in_fp32(model, "cuda:0", "fp16") == 0
    assert keep_rnns_in_fp32(model, "cuda:0", "bf16") == 1 and isinstance(model[1], LSTMInFp32)
    assert rnns_run_in_fp32(model) == 0  # once is enough
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    with torch.no_grad():
        assert torch.equal(model[1](model[0](x))[0], expected)  # no autocast: as before
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model[0](x)
            assert hidden.dtype == torch.bfloat16  # the rest of the model stays under autocast
            out = model[1](hidden)[0]
            packed = model[1](pack_padded_sequence(hidden, torch.tensor([5, 3]), batch_first=True))[0]
    assert out.dtype == torch.float32 and packed.data.dtype == torch.float32
    assert torch.allclose(out, expected, atol=0.05)  # only the bf16 Linear before it differs
    assert isinstance(copy.deepcopy(model)[1], LSTMInFp32)


def test_loader_options_keep_the_cpu_for_training_and_feed_a_gpu():
    from fedasr.utils.device import loader_options

    assert loader_options("cpu") == {"num_workers": 0, "pin_memory": False}
    gpu = loader_options("cuda:0")
    assert gpu["pin_memory"] and 0 <= gpu["num_workers"] <= 4
    assert loader_options("cpu", 2) == {"num_workers": 2, "pin_memory": False, "persistent_workers": False}
    with pytest.raises(ValueError, match="num_workers must be auto or an integer"):
        loader_options("cpu", -1)


def test_a_fit_with_loader_workers_trains_exactly_as_without(tiny_system_inputs):
    # Workers decode audio in other processes (the tokenizer and the dynamic items must pickle); the batches, so
    # the trained weights, are the same as with none.
    from fedasr.models.system import SpeechBrainASRSystem

    seed, manifest = tiny_system_inputs
    results = []
    for workers in (0, 2):
        system = SpeechBrainASRSystem.from_checkpoint(seed, overrides={"num_workers": workers}, device="cpu")
        assert system.loader_options()["num_workers"] == workers
        fit = system.fit(manifest, epochs=1, lr=0.05, batch_size=2, seed=1, optimizer="adam")
        results.append((fit.train_loss, system.state_dict()))
    (loss0, state0), (loss2, state2) = results
    assert loss0 == loss2 and all(torch.equal(state0[k], state2[k]) for k in state0)
