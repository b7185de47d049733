"""bench/full_table_plan.py: the hours of the full recipe follow the recipe's own settings, more GPUs shorten only the
federated stages, and the measured figures of bench/gpu_smoke.sh (its gpu_smoke.json, written here by the real
bench/gpu_smoke_report.py from a fake smoke folder) replace the published one."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    """A bench script as a module (bench/ is no package); registered first, as its dataclasses need."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


plan = _load("full_table_plan")


def rows_of(argv: list[str]) -> dict[str, dict]:
    """The plan's rows for a command line, by stage."""
    args = plan.build_parser().parse_args(argv)
    recipe = plan.read_recipe(args.config, args.set, args.lang)
    data = plan.data_from_folder(Path(args.data)) if args.data else plan.assumed_data(recipe, args)
    rates = plan.resolve_rates(args, recipe)
    return {r["stage"]: r for r in plan.estimate(recipe, data, rates, sorted(set(args.gpus)))}


@pytest.fixture(scope="module")
def default_rows():
    return rows_of([])


def test_defaults_follow_the_recipe(default_rows):
    silo, device = default_rows["cross-silo"], default_rows["cross-device"]
    fl = yaml.safe_load((REPO / "hparams/fl/cross_silo.yaml").read_text())
    pipeline = yaml.safe_load((REPO / "hparams/pipeline/commonvoice.yaml").read_text())
    warmup_speakers, speakers = pipeline["partition"]["warmup_speakers"], pipeline["partition"]["cross_device_clients"]
    warmup_h = 425 * warmup_speakers / (warmup_speakers + speakers)
    silo_audio = fl["rounds"] * fl["local_epochs"] * (425 - warmup_h) * (1 - pipeline["partition"]["valid_fraction"])
    assert silo["audio_h"] == pytest.approx(silo_audio)
    assert silo["gpu_h"] == pytest.approx(silo_audio / plan.PUBLISHED_RATE)
    epochs = next(int(m.group(1)) for name in ("fr.yaml", "base.yaml")  # the overlay's, else its base's
                  for m in [re.search(r"^number_of_epochs:\s*(\d+)", (REPO / "hparams/CommonVoice" / name).read_text(),
                                      re.M)] if m)
    assert default_rows["central"]["gpu_h"] == pytest.approx(425 * epochs / plan.PUBLISHED_RATE)
    cross_device = yaml.safe_load((REPO / "hparams/fl/cross_device.yaml").read_text())
    assert f"{cross_device['rounds']} rounds" in device["what"]  # cross_device.yaml's own, over cross_silo.yaml's
    assert f"{cross_device['clients_per_round']} of {speakers:,}" in device["what"]
    assert f"x {cross_device.get('local_epochs', fl['local_epochs'])} local epochs" in device["what"]  # inherited


def test_more_gpus_shorten_only_the_federated_stages(default_rows):
    for stage in ("warmup", "central"):  # one train-central process on one device
        assert default_rows[stage]["wall_h"][8] == default_rows[stage]["wall_h"][1] == default_rows[stage]["gpu_h"]
    for stage in ("cross-silo", "cross-device"):
        row = default_rows[stage]
        assert row["wall_h"][8] < row["wall_h"][1]
        assert row["wall_h"][8] >= row["gpu_h"] / 8  # sharing GPUs adds no compute
    # 10 silos on 8 GPUs: some GPU trains two silos, so a round takes about two silo-times, not 10/8 of one.
    silo = default_rows["cross-silo"]["wall_h"]
    assert silo[8] == pytest.approx(silo[1] / 5, rel=0.01)


def test_doubling_rounds_in_a_copied_fl_hparams_doubles_the_cross_silo_hours(tmp_path, default_rows):
    fl = yaml.safe_load((REPO / "hparams/fl/cross_silo.yaml").read_text())
    fl["rounds"] *= 2
    copy = tmp_path / "cross_silo.yaml"
    copy.write_text(yaml.safe_dump(fl))
    rows = rows_of(["--set", f"cross_silo.hparams={copy}", "--set", "warmup.number_of_epochs=5"])
    assert rows["cross-silo"]["gpu_h"] == pytest.approx(2 * default_rows["cross-silo"]["gpu_h"])
    assert rows["cross-silo"]["wall_h"][8] == pytest.approx(2 * default_rows["cross-silo"]["wall_h"][8])
    assert rows["warmup"]["gpu_h"] == pytest.approx(default_rows["warmup"]["gpu_h"] / 5)  # 5 of 25 epochs
    assert rows["cross-device"]["gpu_h"] == pytest.approx(default_rows["cross-device"]["gpu_h"])  # its own file


def test_the_recipes_own_client_share_is_kept():
    rows = rows_of(["--gpus", "8", "--set", "cross_silo.set.client_num_gpus=0.5"])
    assert rows["cross-silo"]["share"] == {8: 0.5}
    assert rows["cross-device"]["share"] == {8: 0.33}  # not set: the shortest modeled round


def test_round_model():
    # 10 equal silos of 1 h: one GPU takes 10 h whatever the share; 8 GPUs take 2 h; 10 GPUs 1 h.
    silos = [1.0] * 10
    assert plan.round_hours(silos, 1, 1.0, 0.0) == pytest.approx(10)
    assert plan.round_hours(silos, 1, 0.25, 0.0) == pytest.approx(10)
    assert plan.round_hours(silos, 8, 1.0, 0.0) == pytest.approx(2)
    assert plan.round_hours(silos, 8, 0.5, 0.0) == pytest.approx(2)
    assert plan.round_hours(silos, 10, 1.0, 0.0) == pytest.approx(1)
    # Overheads of clients that share a GPU overlap: 4 small clients, 1 GPU.
    assert plan.round_hours([0.1] * 4, 1, 1.0, 1.0) == pytest.approx(4.4)
    assert plan.round_hours([0.1] * 4, 1, 0.25, 1.0) == pytest.approx(1.4)
    assert plan.best_share([0.1] * 4, 1, 1.0) == 0.25
    # A freed slot takes the next client; clients computing on one GPU share its speed.
    assert plan.round_hours([3.0, 1.0, 1.0, 1.0], 2, 1.0, 0.0) == pytest.approx(3)
    assert plan.round_hours([1.0, 3.0], 1, 0.5, 0.0) == pytest.approx(4)
    assert plan.best_share(silos, 1, 0.001) == 1.0  # no gain from sharing: a whole GPU per silo


def test_the_pipelines_own_gpu_share_is_as_fast_as_the_best_modeled_one():
    """The share the pipeline gives clients on a GPU (fedasr.pipeline.client_gpu_share) against the plan's round
    model: within 2 % of the shortest round for every mode, on 1, 8 and 16 GPUs; a constant 0.25 is not (four
    silos stacked on one of eight GPUs)."""
    args = plan.build_parser().parse_args([])
    recipe = plan.read_recipe(args.config, args.set, args.lang)
    data, rates = plan.assumed_data(recipe, args), plan.resolve_rates(args, recipe)
    overhead_h = rates.overhead_s / 3600
    for mode in plan.MODES:
        compute = plan.client_hours(recipe, data, rates, mode)
        per_round = plan.clients_of(recipe, data, mode)[1]
        for gpus in (1, 8, 16):
            best = min(plan.round_hours(compute, gpus, s, overhead_h) for s in plan.SHARES)
            own = plan.round_hours(compute, gpus, plan.client_gpu_share(gpus, per_round), overhead_h)
            assert own <= 1.02 * best, (mode, gpus)
    silos = plan.client_hours(recipe, data, rates, "cross-silo")
    assert plan.round_hours(silos, 8, 0.25, overhead_h) > 1.5 * plan.round_hours(silos, 8, 0.5, overhead_h)
    text = "\n".join(plan.recommendations(recipe, data, rates, plan.estimate(recipe, data, rates, [1, 8]), [1, 8]))
    assert "the recipe as it is" in text and "--set cross_silo" not in text


def test_central_on_a_gpu_of_its_own_leaves_the_other_stages_one_gpu_fewer(tmp_path):
    rows = rows_of(["--gpus", "1"])
    one_gpu_without_central = sum(r["wall_h"][1] for stage, r in rows.items() if stage != "central")
    assert one_gpu_without_central > rows["central"]["wall_h"][1]  # so on 2 GPUs the other stages set the pace
    out = tmp_path / "plan.md"
    assert plan.main(["--gpus", "1", "2", "--out", str(out)]) == 0
    row = next(line for line in out.read_text().splitlines() if "central_device=cuda:N" in line)
    assert f"| - | {one_gpu_without_central:,.1f} (" in row


def test_writes_the_table_atomically(tmp_path, capsys):
    out = tmp_path / "plan.md"
    assert plan.main(["--gpus", "1", "8", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.strip() == capsys.readouterr().out.strip()  # the file holds what was printed
    assert "| cross-silo |" in text and "wall h, 8 GPUs" in text
    assert "recipes/LibriSpeech/ASR/seq2seq/README.md" in text  # the throughput's source is named
    assert "decoding | not included" in text
    assert not list(tmp_path.glob("*.tmp*"))


# ---- --from-smoke: a gpu_smoke.json written by bench/gpu_smoke_report.py ------------------------------------------

def _csv(path: Path, durations: list[float]) -> None:
    """A fedasr manifest of clips with these durations (the audio files need not exist: only hours are read)."""
    from fedasr.data.manifest import Utterance, write_manifest

    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(path, [Utterance(ID=f"u{i}", duration=seconds, wav=f"/x/u{i}.wav", spk_id=f"s{i % 3}", wrd="bonjour")
                          for i, seconds in enumerate(durations)], durable=False)


def _partition(folder: Path, clients: list[list[float]], warmup: list[float]) -> None:
    entries = []
    for i, durations in enumerate(clients):
        _csv(folder / "clients" / f"{i:03d}" / "train.csv", durations)
        _csv(folder / "clients" / f"{i:03d}" / "valid.csv", [1.0])
        entries.append({"id": f"{i:03d}", "train": f"clients/{i:03d}/train.csv", "valid": f"clients/{i:03d}/valid.csv",
                        "hours": sum(durations) / 3600, "valid_hours": 1 / 3600})
    _csv(folder / "warmup" / "train.csv", warmup)
    (folder / "partition.json").write_text(json.dumps({
        "version": 1, "mode": "cross-silo", "seed": 0, "source": "train.csv",
        "warmup": {"speakers": ["w"], "train": "warmup/train.csv", "utterances": len(warmup),
                   "hours": sum(warmup) / 3600},
        "clients": entries, "excluded": {}, "stats": {}}))


def fake_smoke(out: Path, *, central_device: str = "cuda:0", model: str = "crdnn") -> Path:
    """A finished bench/gpu_smoke.sh folder (what the report reads), then bench/gpu_smoke_report.py's report."""
    _csv(out / "manifests" / "train.csv", [2.0] * 100)  # 200 s of audio
    _csv(out / "manifests" / "dev.csv", [2.0] * 10)
    _csv(out / "manifests" / "test.csv", [2.0] * 10)
    (out / "stages.tsv").write_text("stage\tseconds\tgpu_peak_mib\n" + "".join(
        f"{name}\t10.0\t1000\n" for name in ("central", "silos", "speakers", "test")))
    (out / "central").mkdir()
    (out / "central" / "result.json").write_text(json.dumps(
        {"epochs": 1, "seconds": 2.0, "device": central_device, "precision": "fp32", "model": model,
         "num_parameters": 148_000_000, "gpu_peak_mib": 5000}))  # 200 audio-s in 2 s: 100 audio-s/s
    (out / "test").mkdir()
    (out / "test" / "timing.json").write_text(json.dumps(
        {"device": "cuda:0", "precision": "fp32", "seconds": 1.0, "wer": 0.5, "torch_peak_mib": 900}))  # beam 20/s
    for name, partition, clients, share, fit_sum, send_receive in (
            ("silos", "p_silos", [[50.0], [50.0]], 0.5, 4.0, 5.0),            # 500 audio-s (5 epochs), 125 per client
            ("speakers", "p_speakers", [[10.0]] * 4, 0.25, 2.0, 20.5)):       # 4 x 50 audio-s; 1 s fit each at once
        _partition(out / partition, clients, [2.0])
        (out / name).mkdir()
        (out / name / "metrics.jsonl").write_text(json.dumps(
            {"round": 1, "clients": list(range(len(clients))), "seconds": {"send_receive": send_receive,
                                                                            "evaluate": 2.0},
             "train_fit_seconds_sum": fit_sum, "train_fit_gpu_clients": len(clients),
             "train_fit_gpu_peak_mib_max": 3000, "dev_wer": 0.4}) + "\n")
        (out / name / "fl_config.json").write_text(json.dumps(
            {"config": {"local_epochs": 5, "client_num_gpus": share},
             "dev_manifest": str(out / "manifests" / "dev.csv"), "test_manifest": str(out / "manifests" / "test.csv")}))
        (out / "logs").mkdir(exist_ok=True)
        (out / "logs" / f"{name}.log").write_text(
            f"devices: server cuda:0, clients a {share} share of a GPU, precision fp32\n")
    _load("gpu_smoke_report").report(out, "cuda", "fp32")
    return out / "gpu_smoke.json"


def test_from_smoke_reads_the_report_of_gpu_smoke(tmp_path):
    smoke = fake_smoke(tmp_path / "smoke")
    report = json.loads(smoke.read_text())
    assert report["central"]["train_audio_s_per_s"] == pytest.approx(100.0)
    rates = plan.smoke_rates(smoke, "crdnn")
    assert rates.central == pytest.approx(100.0)
    assert rates.federated == pytest.approx(2 * 125.0)  # two silos shared the GPU at client_num_gpus 0.5
    assert rates.overhead_s == pytest.approx(20.5 - 2.0 / 4)  # the round less one fit, 4 clients at once
    assert rates.greedy == pytest.approx(40 / 2.0) and rates.beam == pytest.approx(20.0)
    rows = rows_of(["--from-smoke", str(smoke)])
    assert rows["central"]["gpu_h"] == pytest.approx(425 * 25 / 100.0)
    # The decoding row needs the dev/test hours of a pipeline folder (--data): not counted without them.
    assert "decoding" not in rows


def test_from_smoke_with_data_counts_decoding(tmp_path):
    smoke = fake_smoke(tmp_path / "smoke")
    data = tmp_path / "pipeline"
    _csv(data / "manifests" / "train.csv", [3600.0] * 10)  # 10 h
    _csv(data / "manifests" / "dev.csv", [3.6] * 1000)     # 1 h
    _csv(data / "manifests" / "test.csv", [3.6] * 1000)
    _partition(data / "partitions" / "cross-silo", [[3600.0 * 0.8]] * 10, [3600.0])
    _partition(data / "partitions" / "cross-device", [[36.0]] * 30, [3600.0])
    rows = rows_of(["--from-smoke", str(smoke), "--data", str(data)])
    assert rows["warmup"]["audio_h"] == pytest.approx(25.0)           # 1 h x 25 epochs, from partition.json
    assert rows["central"]["audio_h"] == pytest.approx(250.0)         # 10 h x 25
    assert "20 of 30 speaker-clients" in rows["cross-device"]["what"]
    assert rows["decoding"]["gpu_h"] > 0
    assert rows["decoding"]["wall_h"][8] == rows["decoding"]["wall_h"][1]


@pytest.mark.parametrize("case", ["missing", "not json", "not the report", "cpu dry run", "other model"])
def test_bad_smoke_file_names_the_file(tmp_path, capsys, case):
    path = tmp_path / "gpu_smoke.json"
    if case == "not json":
        path.write_text("{not json")
    elif case == "not the report":
        path.write_text(json.dumps({"central": {"device": "cuda:0", "model": "crdnn"}}))
    elif case in ("cpu dry run", "other model"):
        path = fake_smoke(tmp_path / "smoke", central_device="cpu" if case == "cpu dry run" else "cuda:0",
                          model="ctc_tiny" if case == "other model" else "crdnn")
    assert plan.main(["--from-smoke", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    expected = {"missing": "not found", "not json": "not a readable JSON", "not the report": "train_audio_s_per_s",
                "cpu dry run": "cpu", "other model": "ctc_tiny"}[case]
    assert expected in err
