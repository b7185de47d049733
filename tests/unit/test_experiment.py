"""Results paths (fedasr.experiment) and the stage runner of the pipeline (fedasr.pipeline): done-markers, skipping,
resumption after a failure, re-running stages whose settings changed."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest
import yaml

from fedasr.utils.settings import deep_merge
from fedasr.pipeline import (
    Layout, Pipeline, PipelineError, Stage, StageFailed, central_beside_warmup, claim_training_folder,
    load_pipeline_config, parse_set_overrides, training_key,
    run_stages, stage_range,
)
from fedasr.experiment import ExperimentPathError, RunId, read_run_id, run_dir, save_run_config

REPO = Path(__file__).resolve().parents[2]


def test_run_dir_is_built_from_the_five_fields(tmp_path):
    run = RunId("CommonVoice", "fr", "cross-silo", "crdnn", 1234)
    assert run_dir(tmp_path, run) == tmp_path / "CommonVoice" / "fr" / "cross-silo" / "crdnn" / "seed1234"


@pytest.mark.parametrize("field,value", [("setting", "federated"), ("model", "crdnn/tiny"), ("language", "f r"),
                                         ("dataset", "")])
def test_run_dir_rejects_fields_that_cannot_name_a_folder(tmp_path, field, value):
    fields = {"dataset": "CommonVoice", "language": "fr", "setting": "central", "model": "crdnn", "seed": 1}
    fields[field] = value
    with pytest.raises(ExperimentPathError, match=field):
        run_dir(tmp_path, RunId(**fields))


def test_saved_run_config_round_trips(tmp_path):
    run = RunId("synth", "fr", "central", "crdnn_tiny", 7)
    save_run_config(tmp_path, run, {"rounds": 3, "strategy": {"name": "fedavg"}})
    assert read_run_id(tmp_path) == run
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"rounds": 3, "strategy": {"name": "fedavg"}}
    save_run_config(tmp_path, run, "lr: 0.5  # resolved\n")
    assert (tmp_path / "config.yaml").read_text() == "lr: 0.5  # resolved\n"
    assert read_run_id(tmp_path / "missing") is None


def recording_pipeline(out: Path, settings: dict, calls: list, fail_at: str | None = None) -> Pipeline:
    def action(name):
        def run():
            calls.append(name)
            if name == fail_at:
                raise RuntimeError(f"{name} broke")
        return run
    stages = [Stage(name, settings.get(name, {}), action(name)) for name in ("a", "b", "c")]
    return Pipeline(out=out, stages=stages, echo=lambda line: None)


def test_finished_stages_are_skipped_and_a_failed_stage_is_redone(tmp_path):
    calls: list = []
    with pytest.raises(RuntimeError, match="b broke"):
        run_stages(recording_pipeline(tmp_path, {}, calls, fail_at="b"))
    assert calls == ["a", "b"]
    assert (tmp_path / ".done.a.json").exists() and not (tmp_path / ".done.b.json").exists()
    calls.clear()
    states = run_stages(recording_pipeline(tmp_path, {}, calls))
    assert calls == ["b", "c"]
    assert states == {"a": "skipped", "b": "ran", "c": "ran"}
    calls.clear()
    assert run_stages(recording_pipeline(tmp_path, {}, calls)) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert calls == []


def test_changed_settings_redo_that_stage_and_the_ones_after(tmp_path):
    calls: list = []
    run_stages(recording_pipeline(tmp_path, {"b": {"rounds": 2}}, calls))
    calls.clear()
    run_stages(recording_pipeline(tmp_path, {"b": {"rounds": 3}}, calls))
    assert calls == ["b", "c"]


def test_stage_selection_and_unfinished_earlier_stages(tmp_path):
    assert stage_range("b", "c", ("a", "b", "c")) == ["b", "c"]
    assert stage_range("2", None, ("a", "b", "c")) == ["b", "c"]
    with pytest.raises(PipelineError, match="unknown stage 'z'"):
        stage_range("z", None, ("a", "b", "c"))
    with pytest.raises(PipelineError, match="comes after"):
        stage_range("c", "a", ("a", "b", "c"))
    calls: list = []
    with pytest.raises(PipelineError, match="stage 'a' is not done"):
        run_stages(recording_pipeline(tmp_path, {}, calls), start="b")
    assert calls == []
    run_stages(recording_pipeline(tmp_path, {}, calls), stop="a")
    run_stages(recording_pipeline(tmp_path, {}, calls), start="b", stop="b")
    assert calls == ["a", "b"]


# ---- a stage beside another (in a child process) -------------------------------------------------------------------

def _child_training(folder: str, behaviour: str, echo) -> None:
    """The child's work: note that it started (and its pid); then finish (echo a result line), fail or hang."""
    Path(folder, "child.pid").write_text(str(os.getpid()))
    Path(folder, "child.started").touch()
    if behaviour == "hang":
        time.sleep(60)
    if behaviour == "outlive c" and not _wait_for(Path(folder, "c.ran")):
        raise RuntimeError("c never ran while the child was running")
    if behaviour == "finish early":
        time.sleep(1)
    if behaviour == "fail":
        raise RuntimeError("b broke in the child")
    echo("   b: trained in the child")
    Path(folder, "child.finished").touch()


def _wait_for(path: Path, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


def beside_pipeline(out: Path, calls: list, lines: list, *, child="finish", a_fails=False) -> Pipeline:
    def action(name):
        def run():
            calls.append(name)
            if name == "a":  # the stage b runs beside: b's child must start while a is still running
                calls.append("b started during a" if _wait_for(out / "child.started") else "b not started")
                if a_fails:
                    raise RuntimeError("a broke")
        return run
    stages = [Stage("a", {}, action("a")),
              Stage("b", {}, action("b"), beside="a", in_child=functools.partial(_child_training, str(out), child)),
              Stage("c", {}, action("c"))]
    return Pipeline(out=out, stages=stages, echo=lines.append)


def test_a_stage_runs_beside_the_stage_it_names_and_is_finished_in_its_turn(tmp_path):
    calls, lines = [], []
    states = run_stages(beside_pipeline(tmp_path, calls, lines))
    assert calls == ["a", "b started during a", "c"]  # b never ran in this process
    assert states == {"a": "ran", "b": "ran", "c": "ran"}
    assert (tmp_path / "child.finished").exists() and (tmp_path / ".done.b.json").exists()
    assert f"== b: running beside a (log: {tmp_path / 'logs' / 'b.log'})" in lines
    b_done = next(i for i, line in enumerate(lines) if line.startswith("== [2/3] b: finished in"))
    assert lines[b_done].endswith("(ran beside a)") and lines[b_done - 1] == "   b: trained in the child"
    assert "b: trained in the child" in (tmp_path / "logs" / "b.log").read_text()  # its console output, kept
    calls.clear()
    assert run_stages(beside_pipeline(tmp_path, calls, lines)) == {"a": "skipped", "b": "skipped", "c": "skipped"}


def test_a_child_stage_may_run_on_until_the_stage_that_needs_it(tmp_path):
    lines, seen = [], {}

    def record(name, check=None):
        def run():
            if check:
                seen[name] = check()
            (tmp_path / f"{name}.ran").touch()
        return run
    stages = [Stage("a", {}, record("a", lambda: _wait_for(tmp_path / "child.started"))),
              Stage("b", {}, record("b"), beside="a", needed_by="d",
                    in_child=functools.partial(_child_training, str(tmp_path), "outlive c")),
              Stage("c", {}, record("c", lambda: (tmp_path / ".done.b.json").exists())),
              Stage("d", {}, record("d", lambda: (tmp_path / ".done.b.json").exists()))]
    states = run_stages(Pipeline(out=tmp_path, stages=stages, echo=lines.append))
    assert states == {"a": "ran", "b": "ran", "c": "ran", "d": "ran"} and not (tmp_path / "b.ran").exists()
    assert seen == {"a": True, "c": False, "d": True}  # b ran beside a and c, and was done before d started
    assert any(line.startswith("== [2/4] b: still running beside the next stages (needed by d") for line in lines)
    stop_at_c = run_stages(Pipeline(out=tmp_path / "2", stages=stages[:3], echo=lines.append))
    assert stop_at_c["b"] == "ran" and (tmp_path / "2" / ".done.b.json").exists()  # waited for before returning


def test_a_child_stage_is_timed_by_its_own_run_not_by_when_it_is_waited_for(tmp_path):
    stages = [Stage("a", {}, lambda: None),
              Stage("b", {}, lambda: None, beside="a", needed_by="d",
                    in_child=functools.partial(_child_training, str(tmp_path), "finish early")),
              Stage("c", {}, lambda: time.sleep(4)), Stage("d", {}, lambda: None)]
    run_stages(Pipeline(out=tmp_path, stages=stages, echo=lambda line: None))
    seconds = yaml.safe_load((tmp_path / "stages.json").read_text())
    assert 1.0 <= seconds["b"] < 4.0 <= seconds["c"]  # b ran ~1 s; it was waited for after c's 4 s


def test_a_failed_child_stage_names_its_log_and_runs_again_in_its_turn(tmp_path):
    calls, lines = [], []
    with pytest.raises(StageFailed, match="b broke in the child") as failure:
        run_stages(beside_pipeline(tmp_path, calls, lines, child="fail"))
    assert str(tmp_path / "logs" / "b.log") in str(failure.value)
    assert (tmp_path / ".done.a.json").exists() and not (tmp_path / ".done.b.json").exists()
    calls.clear()
    assert run_stages(beside_pipeline(tmp_path, calls, lines)) == {"a": "skipped", "b": "ran", "c": "ran"}
    assert calls == ["b", "c"]  # a is done: b runs here, in its turn


def test_a_failed_child_stops_the_pipeline_at_the_next_stage(tmp_path):
    lines, calls = [], []
    # a waits while the child fails
    stages = [Stage("a", {}, lambda: _wait_for(tmp_path / "child.started") and time.sleep(5)),
              Stage("b", {}, lambda: None, beside="a", needed_by="d",
                    in_child=functools.partial(_child_training, str(tmp_path), "fail")),
              Stage("c", {}, lambda: calls.append("c")), Stage("d", {}, lambda: calls.append("d"))]
    with pytest.raises(StageFailed, match="b broke in the child"):
        run_stages(Pipeline(out=tmp_path, stages=stages, echo=lines.append))
    assert calls == []  # found when c was due, not after c at d's turn


def test_a_failing_stage_stops_the_child_beside_it(tmp_path):
    calls, lines = [], []
    with pytest.raises(RuntimeError, match="a broke"):
        run_stages(beside_pipeline(tmp_path, calls, lines, child="hang", a_fails=True))
    pid = int((tmp_path / "child.pid").read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped, not left training for a minute
        os.kill(pid, 0)
    assert not (tmp_path / ".done.a.json").exists() and not (tmp_path / ".done.b.json").exists()


def layout_with_manifests(out: Path, train_text: str = "ID,wav\nu1,a.wav\n") -> Layout:
    config = load_pipeline_config(REPO / "hparams" / "pipeline" / "demo.yaml", {"device": "cpu"})
    layout = Layout(out, config)
    layout.manifests.mkdir(parents=True)
    for split, text in (("train", train_text), ("dev", "ID,wav\nd1,d.wav\n"), ("test", "ID,wav\nt1,t.wav\n")):
        (layout.manifests / f"{split}.csv").write_text(text)
    return layout


def central_overrides(layout: Layout, epochs: int = 25) -> dict:
    return {"manifest_folder": str(layout.manifests), "output_folder": str(layout.run("central")), "model": "ctc_tiny",
            "seed": 1234, "number_of_epochs": epochs}


def test_a_training_stage_refuses_a_folder_trained_with_other_settings_or_data(tmp_path):
    """The pipeline re-runs a stage whose settings changed; SpeechBrain would resume (or keep) the old run in its
    folder, so the warm-up/central stage records what it trains from and refuses a folder trained otherwise."""
    layout = layout_with_manifests(tmp_path / "a")
    key = training_key(layout, "central", central_overrides(layout))
    copy = layout_with_manifests(tmp_path / "b")  # another folder, the same files: the same key (paths left out)
    assert training_key(copy, "central", central_overrides(copy)) == key
    assert training_key(layout, "central", central_overrides(layout, epochs=15)) != key
    other_data = layout_with_manifests(tmp_path / "c", train_text="ID,wav\nu2,b.wav\n")
    assert training_key(other_data, "central", central_overrides(other_data)) != key
    model_yaml = tmp_path / "my_model.yaml"  # a model YAML edited in place: same name, other model
    model_yaml.write_text((REPO / "hparams" / "models" / "ctc_tiny.yaml").read_text())
    own_model = {**central_overrides(layout), "model": str(model_yaml)}
    before_edit = training_key(layout, "central", own_model)
    model_yaml.write_text(model_yaml.read_text().replace("rnn_neurons: 96", "rnn_neurons: 64"))
    assert training_key(layout, "central", own_model) != before_edit

    out = layout.run("central")
    claim_training_folder(out, "central", key)  # a fresh folder: claimed
    claim_training_folder(out, "central", key)  # the same key: resumes
    (out / "result.json").write_text("{}")
    claim_training_folder(out, "central", key)  # finished with the same key (a copied folder): kept
    fewer_epochs = training_key(layout, "central", central_overrides(layout, epochs=15))
    with pytest.raises(PipelineError, match=rf"{out}: holds a central run trained with other settings .* Delete"):
        claim_training_folder(out, "central", fewer_epochs)

    older = tmp_path / "older"  # a run of an earlier fedasr, without a key
    older.mkdir()
    claim_training_folder(older, "warmup", key)  # unfinished: it resumes, and is claimed
    assert (older / "pipeline_training.json").exists()
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "result.json").write_text("{}")
    with pytest.raises(PipelineError, match="result.json there"):  # finished, and the pipeline asks for a new run
        claim_training_folder(finished, "warmup", key)


def test_central_beside_warmup_setting(monkeypatch):
    import fedasr.utils.device as device

    config = load_pipeline_config(REPO / "hparams" / "pipeline" / "demo.yaml", {"device": "cpu", "threads": 1})
    monkeypatch.setattr(device, "usable_cores", lambda: 2)
    assert central_beside_warmup(config)  # auto, 2 cores for 2 single-threaded trainings
    assert not central_beside_warmup({**config, "threads": 2})  # 4 threads on 2 cores: one after the other
    assert not central_beside_warmup({**config, "central_beside_warmup": False})
    assert central_beside_warmup({**config, "threads": 2, "central_beside_warmup": True})
    assert not central_beside_warmup({**config, "central": {"init_from": "warmup"}})  # it needs the warm-up's model
    with pytest.raises(PipelineError, match="central.init_from is warmup"):
        load_pipeline_config(REPO / "hparams" / "pipeline" / "demo.yaml",
                             {"central_beside_warmup": True, "central": {"init_from": "warmup"}})
    with pytest.raises(PipelineError, match="central_beside_warmup must be auto, true or false"):
        load_pipeline_config(REPO / "hparams" / "pipeline" / "demo.yaml", {"central_beside_warmup": "yes"})


def test_pipeline_config_overrides_and_errors(tmp_path):
    overrides = parse_set_overrides(["cross_silo.set.rounds=2", "corpus.speakers=12", "model=ctc_tiny"])
    config = load_pipeline_config(REPO / "hparams" / "pipeline" / "demo.yaml", overrides)
    assert config["cross_silo"]["set"]["rounds"] == 2 and config["cross_silo"]["set"]["local_epochs"] == 2
    assert config["corpus"]["speakers"] == 12 and config["model"] == "ctc_tiny"
    with pytest.raises(PipelineError, match="unknown key"):
        load_pipeline_config(REPO / "hparams" / "pipeline" / "demo.yaml", {"rounds": 3})
    with pytest.raises(PipelineError, match="not KEY=VALUE"):
        parse_set_overrides(["rounds"])
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}



def test_a_pipeline_file_from_before_the_device_and_silo_layout_keys_still_loads(tmp_path):
    # A user's pipeline file (or a finished pipeline folder's pipeline.yaml) written before `device`, `precision`
    # and the partition's silo layout keys existed keeps working, with the behaviour it had.
    current = yaml.safe_load((REPO / "hparams" / "pipeline" / "demo.yaml").read_text())
    older = {k: v for k, v in current.items() if k not in ("device", "precision", "central_beside_warmup")}
    older["partition"] = {k: v for k, v in current["partition"].items()
                          if k not in ("silo_sizes", "size_exponent", "skew", "skew_share")}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(older))
    config = load_pipeline_config(path)
    assert (config["device"], config["precision"], config["central_beside_warmup"]) == ("auto", "fp32", "auto")
    assert config["partition"] == current["partition"]  # the demo's silo layout is partition_manifest's default


@pytest.mark.parametrize("hparams", ["hparams/fl/cross_silo.yaml", "hparams/fl/cross_device.yaml", "hparams/fl/paper.yaml"])
def test_a_federated_stage_runs_from_one_resolved_settings_file(tmp_path, hparams):
    """The pipeline resolves a stage's settings once (file + set + seed + fitting) and hands `fedasr federate` that
    file: read back, it is the same configuration, with no overrides travelling as --set strings."""
    from fedasr.fl.config import load_fl_config
    from fedasr.pipeline import write_fl_settings

    config = load_fl_config(REPO / hparams, {"rounds": 3, "seed": 7, "evaluation": {"test_decoding": "greedy"}})
    path = write_fl_settings(tmp_path, config)
    assert load_fl_config(path) == config
    assert "extends" not in path.read_text()


def test_fl_defaults_live_in_one_place():
    # hparams/fl/cross_silo.yaml documents every federated key with its default; FLConfig's dataclass defaults (what
    # a file that omits a key gets) must be the same values, so the two cannot drift apart again.
    from fedasr.fl.config import FLConfig, load_fl_config

    assert FLConfig().to_dict() == load_fl_config(REPO / "hparams" / "fl" / "cross_silo.yaml").to_dict()


def test_every_set_option_reads_values_alike():
    # One rule for `--set` in federate, the pipeline and train-central: values read as the settings files are (YAML
    # 1.2): 1e-3 is a number everywhere, "on" stays a word.
    from fedasr.fl.config import parse_overrides
    from fedasr.models.hparams import parse_overrides as experiment_overrides

    assert parse_overrides(["lr=1e-3", "tag=on"]) == {"lr": 0.001, "tag": "on"}
    assert parse_set_overrides(["cross_silo.set.lr=1e-3"]) == {"cross_silo": {"set": {"lr": 0.001}}}
    assert experiment_overrides(["--set", "lr=1e-3"])["lr"] == 0.001
