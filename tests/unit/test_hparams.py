"""Experiment YAMLs: every file composes and builds; overrides and overlays with unknown keys are errors;
models plug in through roles checked at load time; normaliser statistics travel in state_dict and freeze."""

from pathlib import Path

import pytest
import torch

from fedasr.models.glue import lstm_forget_gate_bias, zero_parameters
from fedasr.models.hparams import HparamsError, compose_yaml, load_experiment, parse_overrides
from fedasr.models.model import AcousticModel, ModelDefinitionError, build_acoustic_model, count_parameters
from fedasr.models.normalization import FrozenableInputNormalization

HPARAMS = Path(__file__).resolve().parents[2] / "hparams"
BASE = HPARAMS / "CommonVoice" / "base.yaml"
REQUIRED = ["--manifest_folder=/nonexistent/manifests", "--output_folder=/nonexistent/out"]
TINY_MODELS = sorted(p.stem for p in (HPARAMS / "models").glob("*_tiny.yaml"))
FULL_MODELS = sorted(p.stem for p in (HPARAMS / "models").glob("*.yaml") if not p.stem.endswith("_tiny"))
EXPERIMENTS = sorted(p.name for p in (HPARAMS / "CommonVoice").glob("*.yaml"))


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def build(experiment: str, *overrides: str) -> tuple:
    exp = load_experiment(HPARAMS / "CommonVoice" / experiment, [*REQUIRED, *overrides])
    return exp, build_acoustic_model(exp.hparams, source=exp.model_name)


def test_the_shipped_models_include_tiny_variants_of_each():
    assert {"crdnn", "conformer", "ctc"} <= set(FULL_MODELS)
    assert TINY_MODELS == sorted(f"{m}_tiny" for m in FULL_MODELS)
    assert {"fr.yaml", "it.yaml", "en.yaml", "de.yaml", "es.yaml"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_yaml_composes(experiment):
    text, model = compose_yaml(HPARAMS / "CommonVoice" / experiment)
    assert "modules:" in text and model
    exp = load_experiment(HPARAMS / "CommonVoice" / experiment, REQUIRED + ["--model=crdnn_tiny"])
    assert exp.hparams["language"] in {"fr", "it", "en", "de", "es"}
    assert "!PLACEHOLDER" not in exp.resolved_yaml


def test_language_overlays_change_only_what_differs():
    it = load_experiment(HPARAMS / "CommonVoice" / "it.yaml", REQUIRED + ["--model=ctc_tiny"]).hparams
    assert it["language"] == "it" and it["vocab_size"] == 500
    assert it["number_of_epochs"] == load_experiment(BASE, REQUIRED + ["--model=ctc_tiny"]).hparams["number_of_epochs"]
    for overlay in ("fr", "it", "en", "de", "es"):
        lines = [l for l in (HPARAMS / "CommonVoice" / f"{overlay}.yaml").read_text().splitlines() if l and not l.startswith("#")]
        assert len(lines) <= 6, f"{overlay}.yaml should be a small overlay"


@pytest.mark.parametrize("model", TINY_MODELS)
def test_tiny_models_build_check_and_stay_under_one_million_parameters(model):
    exp, acoustic = build("synth.yaml", f"--model={model}")
    assert count_parameters(acoustic) < 1_000_000
    assert acoustic.output_neurons == exp.hparams["vocab_size"]
    assert acoustic.has_decoder == (not model.startswith("ctc"))
    assert any(k.startswith("roles.normalize.") for k in acoustic.state_dict())


def forget_and_other_gate_biases(lstm: torch.nn.LSTM) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed (bias_ih + bias_hh) biases of every layer and direction: forget gates, the other three gates."""
    params = dict(lstm.named_parameters())
    hidden = lstm.hidden_size
    sums = [params[name] + params[name.replace("bias_ih", "bias_hh")] for name in params if name.startswith("bias_ih")]
    total = torch.stack(sums)
    return total[:, hidden:2 * hidden], torch.cat([total[:, :hidden], total[:, 2 * hidden:]], dim=1)


def test_the_tiny_ctc_model_starts_with_open_lstm_forget_gates():
    _, acoustic = build("synth.yaml", "--model=ctc_tiny")
    lstms = [m for m in acoustic.modules() if isinstance(m, torch.nn.LSTM)]
    assert lstms
    for lstm in lstms:
        forget, others = forget_and_other_gate_biases(lstm)
        assert torch.equal(forget, torch.full_like(forget, 2.0)) and not others.any()


def test_the_tiny_ctc_model_starts_with_a_zero_ctc_head():
    _, acoustic = build("synth.yaml", "--model=ctc_tiny")
    head = list(acoustic.roles["ctc_head"].parameters())
    assert head and not any(p.any() for p in head)
    assert all(p.any() for name, p in acoustic.roles["encoder"].named_parameters() if name.endswith("weight"))


def test_zero_parameters_zeroes_a_layer_and_names_a_module_without_parameters():
    layer = torch.nn.Linear(3, 2)
    assert zero_parameters(layer) is layer and not layer.weight.any() and not layer.bias.any()
    with pytest.raises(ValueError, match="no parameters; point it at the output layer"):
        zero_parameters(torch.nn.ReLU())


def test_lstm_forget_gate_bias_reaches_every_layer_and_direction_and_names_a_wrong_target():
    net = torch.nn.Sequential(torch.nn.LSTM(4, 3, num_layers=2, bidirectional=True), torch.nn.Linear(6, 2))
    weights = [p.clone() for name, p in net.named_parameters() if "bias" not in name]
    assert lstm_forget_gate_bias(net, forget_bias=1.5) is net
    forget, others = forget_and_other_gate_biases(net[0])
    assert forget.shape == (4, 3) and torch.equal(forget, torch.full_like(forget, 1.5)) and not others.any()
    assert all(torch.equal(a, b) for a, b in zip(weights, (p for name, p in net.named_parameters() if "bias" not in name)))
    with pytest.raises(ValueError, match="no torch.nn.LSTM.*model YAML"):
        lstm_forget_gate_bias(torch.nn.GRU(4, 3))


@pytest.mark.slow
@pytest.mark.parametrize("model", FULL_MODELS)
def test_full_models_build(model):
    exp, acoustic = build("fr.yaml", f"--model={model}")
    assert exp.hparams["n_mels"] == 80
    assert count_parameters(acoustic) > 5_000_000


def test_model_can_be_passed_as_a_yaml_path():
    exp = load_experiment(BASE, REQUIRED + [f"--model={HPARAMS / 'models' / 'ctc_tiny.yaml'}"])
    assert exp.model_name == "ctc_tiny"


def test_unknown_override_key_is_an_error_listing_valid_keys():
    with pytest.raises(HparamsError, match=r"number_of_epoch.*valid keys.*number_of_epochs"):
        load_experiment(BASE, REQUIRED + ["--number_of_epoch=3"])
    with pytest.raises(HparamsError, match="not found"):
        load_experiment(BASE, REQUIRED + ["--model=no_such_model"])


def test_missing_placeholder_is_an_error_naming_the_key():
    with pytest.raises(HparamsError, match="output_folder"):
        load_experiment(BASE, ["--manifest_folder=/x"])


def test_overlay_with_unknown_key_is_an_error(tmp_path):
    overlay = tmp_path / "xx.yaml"
    overlay.write_text(f"extends: {BASE}\nvocab_sise: 100\n")
    with pytest.raises(HparamsError, match=r"xx.yaml.*vocab_sise"):
        load_experiment(overlay, REQUIRED)


def test_overrides_parse_speechbrain_style_and_yaml_strings():
    assert parse_overrides(["--number_of_epochs=3", "--lr", "0.5", "--model=ctc_tiny"]) == {
        "number_of_epochs": 3, "lr": 0.5, "model": "ctc_tiny"}
    assert parse_overrides("{batch_size: 4, sorting: random}") == {"batch_size": 4, "sorting": "random"}
    with pytest.raises(HparamsError):
        parse_overrides(["--lr"])


def test_model_yaml_with_a_broken_role_is_rejected_at_load_time(tmp_path):
    tiny = (HPARAMS / "models" / "ctc_tiny.yaml").read_text()
    wrong_head = tmp_path / "wrong_head.yaml"
    wrong_head.write_text(tiny.replace("    input_size: 96\n    n_neurons: !ref <output_neurons>", "    input_size: 96\n    n_neurons: 7"))
    exp = load_experiment(BASE, REQUIRED + [f"--model={wrong_head}"])
    with pytest.raises(ModelDefinitionError, match="ctc_head.*output_neurons"):
        build_acoustic_model(exp.hparams, source="wrong_head.yaml")
    with pytest.raises(ModelDefinitionError, match="unknown role"):
        AcousticModel({**exp.hparams["modules"], "lm": torch.nn.Linear(2, 2)}, output_neurons=60)
    with pytest.raises(ModelDefinitionError, match="needs roles"):
        AcousticModel({**exp.hparams["modules"], "decoder": torch.nn.Linear(2, 2)}, output_neurons=60)


def test_normaliser_statistics_travel_in_state_dict_and_freeze():
    norm = FrozenableInputNormalization(norm_type="global", update_until_epoch=2)
    feats = torch.randn(4, 50, 10) * 3 + 2
    norm.train()
    norm(feats, torch.ones(4), epoch=1)
    state = norm.state_dict()
    assert {"glob_mean", "glob_std", "num_frames"} <= set(state) and state["glob_mean"].shape == (10,)

    rebuilt = FrozenableInputNormalization(norm_type="global")
    rebuilt.load_state_dict(state)
    rebuilt.freeze()
    rebuilt.train()
    out = rebuilt(torch.randn(4, 50, 10) + 100, torch.ones(4), epoch=0)  # would update if not frozen
    assert torch.equal(rebuilt.glob_mean, state["glob_mean"]) and int(rebuilt.num_frames) == 200
    assert out.mean() > 10  # normalised with the stored statistics, not re-estimated ones


def test_tokenizer_has_fixed_special_ids_and_decodes_without_them(tmp_path):
    from fedasr.models.tokenizer import BLANK_ID, BOS_ID, EOS_ID, Tokenizer, TokenizerError, train_tokenizer

    sentences = ["le chat mange une pomme", "la fille regarde le journal", "mon voisin porte du pain"] * 10
    tok = train_tokenizer(sentences, tmp_path / "tok.model", vocab_size=40)
    assert tok.pieces()[:4] == ["<blank>", "<unk>", "<s>", "</s>"] and tok.vocab_size <= 40
    ids = tok.encode("le chat mange du pain")
    assert min(ids) > EOS_ID
    assert tok.decode([BOS_ID, *ids, BLANK_ID, EOS_ID, 10_000]) == "le chat mange du pain"
    assert Tokenizer(tmp_path / "tok.model").encode("la fille") == tok.encode("la fille")  # a later stage loads it
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(tmp_path / "missing.model")


def test_initial_weights_are_reproducible_from_the_yaml_seed():
    first = build("synth.yaml")[1].state_dict()
    torch.randn(10)  # whatever ran before, the build seeds itself from `seed:`
    second = build("synth.yaml")[1].state_dict()
    third = build("synth.yaml", "--seed=7")[1].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["roles.ctc_head.w.weight"], third["roles.ctc_head.w.weight"])


# ---- one override syntax: --set KEY=VALUE everywhere, SpeechBrain's --key=value kept (issue 15) ---------------------

def train_central_overrides(monkeypatch, capsys, *args: str) -> tuple[int, dict]:
    """Run `fedasr train-central` up to the experiment it would train: (exit code, {"yaml", "hparams"})."""
    import fedasr.models.train as train
    from fedasr.cli import main

    seen = {}

    def fake_train_central(experiment_file, overrides, **options):
        exp = load_experiment(experiment_file, overrides)
        seen.update(yaml=exp.resolved_yaml, hparams=exp.hparams, options=options)
        return {}

    monkeypatch.setattr(train, "train_central", fake_train_central)
    code = main(["train-central", *args])
    capsys.readouterr()
    return code, seen


def test_train_central_set_equals_speechbrain_style(monkeypatch, capsys):
    synth = str(HPARAMS / "CommonVoice" / "synth.yaml")
    _, sb_style = train_central_overrides(monkeypatch, capsys, synth, *REQUIRED, "--number_of_epochs=3")
    _, set_form = train_central_overrides(monkeypatch, capsys, synth, *REQUIRED, "--set", "number_of_epochs=3")
    _, before = train_central_overrides(monkeypatch, capsys, "--set", "number_of_epochs=3", synth, *REQUIRED)
    _, joined = train_central_overrides(monkeypatch, capsys, synth, *REQUIRED, "--set=number_of_epochs=3")
    assert sb_style["hparams"]["number_of_epochs"] == 3
    assert set_form["yaml"] == sb_style["yaml"] == before["yaml"] == joined["yaml"]
    # Values are read alike in both forms (YAML 1.2, as HyperPyYAML reads the file): 1e-3 is a number in both.
    assert parse_overrides(["--set", "lr=1e-3"]) == parse_overrides(["--lr=1e-3"]) == {"lr": 0.001}


def test_train_central_takes_both_forms_together_and_dotted_keys(monkeypatch, capsys):
    synth = str(HPARAMS / "CommonVoice" / "synth.yaml")
    code, seen = train_central_overrides(
        monkeypatch, capsys, "--set", "batch_size=3", synth, *REQUIRED, "--number_of_epochs=2", "--set",
        "decoding.beam_size=7", "--device=cpu", "--set", "sorting=descending", "--model=crdnn_tiny")
    hp = seen["hparams"]
    assert code == 0 and seen["options"]["device"] == "cpu"
    assert (hp["batch_size"], hp["number_of_epochs"], hp["sorting"]) == (3, 2, "descending")
    assert hp["decoding"]["beam_size"] == 7 and "ctc_weight" in hp["decoding"]  # merged into the section
    # In order, the later value wins, whichever the form.
    assert parse_overrides(["--lr=0.1", "--set", "lr=0.2"]) == {"lr": 0.2}
    assert parse_overrides(["--set", "lr=0.2", "--lr=0.1"]) == {"lr": 0.1}


def test_a_bad_set_key_is_named_with_its_did_you_mean(monkeypatch, capsys, tmp_path):
    from fedasr.cli import main

    synth = str(HPARAMS / "CommonVoice" / "synth.yaml")
    code = main(["train-central", synth, f"--output_folder={tmp_path / 'o'}", f"--manifest_folder={tmp_path}",
                 "--set", "number_of_epoch=3"])
    err = capsys.readouterr().err
    assert code == 2 and "['number_of_epoch']" in err and "did you mean 'number_of_epoch' -> 'number_of_epochs'?" in err
    assert not (tmp_path / "o").exists()
    # A dotted key below a plain mapping is checked too (HyperPyYAML checks only the top level).
    with pytest.raises(HparamsError, match=r"\['decoding.beam_sise'\].*did you mean 'beam_sise' -> 'beam_size'"):
        load_experiment(BASE, REQUIRED + ["--model=crdnn_tiny", "--set", "decoding.beam_sise=3"])
    with pytest.raises(HparamsError, match="not KEY=VALUE"):
        parse_overrides(["--set", "number_of_epochs"])
    with pytest.raises(HparamsError, match="--set has no KEY=VALUE"):
        parse_overrides(["--set"])
