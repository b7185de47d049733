"""Bad input (issue 7): each case gets a clear error (the file, row or key, and the fix) or a counted skip, never a
bare stack trace, and nothing is left corrupted. Real mp3/wav files (soundfile), real TSVs, the real CLI.

Item -> test (here unless another file is named):

- TSV row with a wrong column count: counted skip ``malformed_row``, file:line in the log ->
  test_commonvoice.py::test_report_counts_every_skip_by_reason, ::test_skipped_log_names_split_line_clip_and_reason,
  ::test_malformed_row_is_named_in_the_log_with_file_and_line
- TSV header lacking a required column: error -> test_commonvoice.py::test_missing_required_column_names_file_column_and_columns_found
  (library) and test_cli_tsv_header_without_a_required_column_exits_2 (CLI)
- clip missing, empty, not audio: counted skips -> test_commonvoice.py::test_report_counts_every_skip_by_reason
- clip truncated: counted skip ``truncated_clip`` -> test_truncated_mp3_is_a_counted_skip
- sample rate other than 48 kHz, stereo: kept, counted in the report, converted when loaded ->
  test_other_sample_rates_and_stereo_are_kept_counted_and_converted
- sentence in the wrong script: counted skip ``wrong_script`` -> test_sentence_in_another_script_is_a_counted_skip
- unknown language: error -> test_commonvoice.py::test_unknown_language_is_an_error_before_any_work (library) and
  test_cli_unknown_language_exits_2_without_traceback (CLI, a real subprocess)
- partition that leaves a client with no data: a single-utterance client is excluded and counted ->
  test_partition.py::test_single_utterance_client_is_excluded_and_counted; no client left at all is an error ->
  test_cli_partition_leaving_no_client_with_data_exits_2
- YAML with a typo in a key -> test_hparams.py::test_unknown_override_key_is_an_error_listing_valid_keys,
  ::test_overlay_with_unknown_key_is_an_error (library) and test_cli_yaml_key_typo_exits_2 (train-central overlay
  and override, federate, demo); a pipeline YAML (no ``extends:``) with a typo'd or wrong-typed key in any section,
  checked whole before the first stage -> test_pipeline_yaml_typo_or_wrong_type_names_file_key_and_fix,
  test_pipeline_set_override_typo_is_blamed_on_the_overrides, test_cli_pipeline_yaml_typo_exits_2_before_any_stage;
  a number given as text in an experiment overlay or override -> test_experiment_number_given_as_text_is_an_error
- checkpoint of another model or tokenizer -> test_seed_checkpoint_with_weights_of_another_model_is_refused (library,
  `evaluate` and `federate` CLI: refused before the simulation starts),
  test_seed_checkpoint_with_another_tokenizer_is_refused, test_train_central_refuses_to_resume_another_models_checkpoints
  (an output folder reused with another vocabulary); the federated resume of another run's checkpoint ->
  test_fl_checkpoint.py::test_existing_run_needs_resume_and_same_settings (settings fingerprint)
- nothing corrupted: a fresh prepare failing half-way leaves nothing -> test_commonvoice.py::
  test_a_failure_midway_leaves_no_partial_outputs; a re-run failing half-way keeps complete files and no done
  marker, and the re-run after the fix works -> test_failed_rerun_leaves_complete_files_and_the_fixed_rerun_works
- unwritable results folder or full disk: exit 2 before any work -> test_unwritable_or_full_output_folder_fails_fast
  (prepare, partition, train-central, federate, demo), test_probe_failing_for_lack_of_space_says_so; a disk that
  fills up mid-run: exit 2 with "disk full", previous files whole -> test_failed_rerun_leaves_complete_files_and_...
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import fedasr.data.commonvoice as commonvoice
from fedasr.cli import main as cli_main
from fedasr.data.commonvoice import prepare_common_voice
from fedasr.data.manifest import read_manifest
from fedasr.utils.io import done_marker

REPO = Path(__file__).resolve().parents[2]
HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents"
SENTENCES = ["le chat dort", "la pluie tombe", "un vent froid", "mon ami chante", "le pain est chaud",
             "elle lit un livre", "nous marchons vite", "il fait beau"]


def tone(seconds: float, rate: int = 48000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32")
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def row(client: str, clip: str, sentence: str) -> str:
    return "\t".join([client, clip, sentence, "2", "0", "twenties", "", ""])


def make_release(root: Path, rows: list[str], clips: dict[str, tuple] | None = None) -> Path:
    """A Common Voice folder: ``clips`` maps a name to (seconds, rate, channels); ``rows`` is train.tsv; empty
    dev.tsv and test.tsv."""
    (root / "clips").mkdir(parents=True)
    for name, (seconds, rate, channels) in (clips or {}).items():
        path = root / "clips" / name
        sf.write(path, tone(seconds, rate, channels), rate, format="MP3" if name.endswith(".mp3") else "WAV")
    (root / "train.tsv").write_text(HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    for split in ("dev", "test"):
        (root / f"{split}.tsv").write_text(HEADER + "\n", encoding="utf-8")
    return root


def cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli_main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def skipped_lines(out: Path) -> set[str]:
    return set((out / "skipped.tsv").read_text(encoding="utf-8").splitlines()[1:])


# ---------------------------------------------------------------------------------------------- prepare: TSVs


def test_cli_tsv_header_without_a_required_column_exits_2(tmp_path, capsys):
    cv = make_release(tmp_path / "cv", [])
    (cv / "dev.tsv").write_text("client_id\tpath\ttext\nspk\ta.mp3\tbonjour\n", encoding="utf-8")
    code, err = cli(["prepare", str(cv), str(tmp_path / "out"), "--lang", "fr"], capsys)
    assert code == 2
    assert f"{cv.resolve() / 'dev.tsv'}, line 1" in err and "'sentence'" in err  # the file, the row, the column
    assert "pass the folder of one locale of an unmodified Common Voice release" in err  # the fix
    assert not (tmp_path / "out").exists()  # checked before any work


def test_cli_unknown_language_exits_2_without_traceback(tmp_path):
    cv = make_release(tmp_path / "cv", [row("s", "a.mp3", "bonjour")], {"a.mp3": (1.0, 48000, 1)})
    result = subprocess.run(
        [sys.executable, "-m", "fedasr.cli", "prepare", str(cv), str(tmp_path / "out"), "--lang", "xx"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "'xx'" in result.stderr and "--generic-normalizer" in result.stderr and "fr" in result.stderr


# ---------------------------------------------------------------------------------------------- prepare: clips


def test_truncated_mp3_is_a_counted_skip(tmp_path):
    cv = make_release(tmp_path / "cv", [row("s1", "full.mp3", "le chat dort"), row("s1", "cut.mp3", "la pluie tombe")],
                      {"full.mp3": (3.0, 48000, 1), "cut.mp3": (3.0, 48000, 1)})
    cut = cv / "clips" / "cut.mp3"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])  # a partial download
    assert sf.info(str(cut)).duration == pytest.approx(3.0)  # what the header alone claims
    report = prepare_common_voice(cv, tmp_path / "out", lang="fr", workers=1, splits=("train",))
    assert report["splits"]["train"]["skipped"] == {"truncated_clip": 1}
    assert skipped_lines(tmp_path / "out") == {"train\t3\tcut.mp3\ttruncated_clip"}
    assert [u.ID for u in read_manifest(tmp_path / "out" / "train.csv")] == ["full"]


def test_other_sample_rates_and_stereo_are_kept_counted_and_converted(tmp_path, caplog):
    clips = {"cv.mp3": (1.0, 48000, 1), "low.mp3": (2.0, 16000, 1), "stereo.mp3": (1.5, 48000, 2),
             "wide.wav": (0.5, 22050, 2)}
    rows = [row("s1", name, SENTENCES[i]) for i, name in enumerate(clips)]
    cv = make_release(tmp_path / "cv", rows, clips)
    report = prepare_common_voice(cv, tmp_path / "out", lang="fr", workers=1, splits=("train",))
    train = report["splits"]["train"]
    assert train["kept"] == 4 and train["skipped_total"] == 0
    assert train["audio_formats"] == {"48000 Hz, 1 ch": 1, "16000 Hz, 1 ch": 1, "48000 Hz, 2 ch": 1,
                                      "22050 Hz, 2 ch": 1}
    assert "not 48000 Hz, 1 ch" in caplog.text and "16000 Hz, 1 ch" in caplog.text
    durations = {u.ID: u.duration for u in read_manifest(tmp_path / "out" / "train.csv")}
    assert durations == pytest.approx({"cv": 1.0, "low": 2.0, "stereo": 1.5, "wide": 0.5}, abs=0.06)

    from fedasr.models.dataio import AudioLoader

    load = AudioLoader(16000)  # what training does with every clip: mono at the model's rate
    for name, (seconds, _, _) in clips.items():
        wav = load(str(cv / "clips" / name))
        assert wav.dim() == 1 and wav.shape[0] == pytest.approx(seconds * 16000, abs=0.06 * 16000), name
        assert 0.1 < float(wav.abs().max()) < 0.5, name  # the tone survived the down-mix (no cancelled channels)


# ---------------------------------------------------------------------------------------------- prepare: text


def test_sentence_in_another_script_is_a_counted_skip(tmp_path):
    rows = [row("s1", "a.mp3", "Le chat dort."), row("s1", "b.mp3", "Кошка спит."), row("s2", "c.mp3", "猫が寝ている"),
            row("s2", "d.mp3", "Le nº 1ª est là, ça va ?")]
    cv = make_release(tmp_path / "cv", rows, {n: (1.0, 48000, 1) for n in ("a.mp3", "b.mp3", "c.mp3", "d.mp3")})
    report = prepare_common_voice(cv, tmp_path / "out", lang="fr", workers=1, splits=("train",), keep_digits=True)
    assert report["splits"]["train"]["skipped"] == {"wrong_script": 2}
    assert skipped_lines(tmp_path / "out") == {"train\t3\tb.mp3\twrong_script", "train\t4\tc.mp3\twrong_script"}
    assert [u.wrd for u in read_manifest(tmp_path / "out" / "train.csv")] == ["le chat dort", "le nº 1ª est là ça va"]
    generic = prepare_common_voice(cv, tmp_path / "generic", lang="ru", generic_normalizer=True, workers=1,
                                   splits=("train",), keep_digits=True)
    assert generic["splits"]["train"]["kept"] == 4  # the generic rules know no script: nothing is dropped


# ---------------------------------------------------------------------------------------------- nothing corrupted


def test_failed_rerun_leaves_complete_files_and_the_fixed_rerun_works(tmp_path, monkeypatch, capsys):
    clips = {f"{i}.mp3": (1.0, 48000, 1) for i in range(4)}
    rows = [row(f"s{i % 2}", f"{i}.mp3", SENTENCES[i]) for i in range(4)]
    cv = make_release(tmp_path / "cv", rows, clips)
    out = tmp_path / "out"
    prepare_common_voice(cv, out, lang="fr", workers=1)
    before = (out / "train.csv").read_text(encoding="utf-8")

    with open(cv / "train.tsv", "a", encoding="utf-8") as handle:  # new input, and the disk fails on its 3rd clip
        handle.write(row("s2", "0.mp3", "il fait beau") + "\n")
    real_read, calls = commonvoice.read_duration, []

    def failing_read(path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", path)
        return real_read(path)

    monkeypatch.setattr(commonvoice, "read_duration", failing_read)
    code, err = cli(["prepare", str(cv), str(out), "--lang", "fr", "--workers", "1"], capsys)
    assert code == 2 and "disk full while writing" in err and "run it again" in err
    assert (out / "train.csv").read_text(encoding="utf-8") == before  # the old file, whole; no half-written one
    assert not done_marker(out, commonvoice.STAGE).exists()  # so the next run redoes the work
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(commonvoice, "read_duration", real_read)
    report = prepare_common_voice(cv, out, lang="fr", workers=1)
    assert report["status"] == "prepared" and report["splits"]["train"]["skipped"] == {"duplicate_clip": 1}
    assert len(read_manifest(out / "train.csv")) == 4


# ---------------------------------------------------------------------------------------------- partition


def test_cli_partition_leaving_no_client_with_data_exits_2(tmp_path, capsys):
    clips = {f"{i}.mp3": (0.5, 48000, 1) for i in range(4)}
    cv = make_release(tmp_path / "cv", [row(f"spk{i}", f"{i}.mp3", SENTENCES[i]) for i in range(4)], clips)
    prepare_common_voice(cv, tmp_path / "m", lang="fr", workers=1)
    code, err = cli(["partition", str(tmp_path / "m"), str(tmp_path / "p"), "--mode", "cross-device",
                     "--warmup-speakers", "1"], capsys)  # 3 speakers left, one utterance each
    assert code == 2
    assert str((tmp_path / "m" / "train.csv").resolve()) in err and "no client is left with data" in err
    assert "below_min_utterances_speakers" in err and "--min-utterances" in err  # why, and the fix
    assert not (tmp_path / "p" / "partition.json").exists()


# ---------------------------------------------------------------------------------------------- YAML typos


def test_cli_yaml_key_typo_exits_2(tmp_path, capsys):
    overlay = tmp_path / "my_fr.yaml"
    overlay.write_text(f"extends: {REPO / 'hparams/CommonVoice/synth.yaml'}\nnumber_of_epoch: 3\n", encoding="utf-8")
    code, err = cli(["train-central", str(overlay), f"--output_folder={tmp_path / 'o'}",
                     f"--manifest_folder={tmp_path}"], capsys)
    assert code == 2 and str(overlay) in err and "did you mean 'number_of_epoch' -> 'number_of_epochs'?" in err

    code, err = cli(["train-central", str(REPO / "hparams/CommonVoice/synth.yaml"), "--number_of_epoch=3",
                     f"--output_folder={tmp_path / 'o'}", f"--manifest_folder={tmp_path}"], capsys)
    assert code == 2 and "['number_of_epoch']" in err and "did you mean 'number_of_epoch' -> 'number_of_epochs'?" in err

    fl_yaml = tmp_path / "fl.yaml"
    fl_yaml.write_text(f"extends: {REPO / 'hparams/fl/cross_silo.yaml'}\nlocal_epoch: 3\n", encoding="utf-8")
    code, err = cli(["federate", str(fl_yaml), "--partition", str(tmp_path), "--seed-checkpoint", str(tmp_path),
                     "--output-dir", str(tmp_path / "fl")], capsys)
    assert code == 2 and str(fl_yaml) in err and "['local_epoch']" in err and "local_epochs" in err

    code, err = cli(["demo", str(tmp_path / "demo"), "--set", "partiton.mode=iid"], capsys)
    assert code == 2 and "['partiton']" in err and "partition" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "fl").exists()  # nothing started


PIPELINE_YAML_CASES = {  # case: (text in hparams/pipeline/demo.yaml, its replacement, what the message must hold)
    "top-level typo": ("\nevaluation:", "\nevalution:", ["['evalution']", "'evalution' -> 'evaluation'"]),
    "nested typo": ("  warmup_speakers: 12 ", "  warmup_speaker: 12 ",
                    ["['partition.warmup_speaker']", "'warmup_speaker' -> 'warmup_speakers'", "valid_fraction"]),
    "corpus option typo": ("  speakers: 58", "  speakrs: 58", ["['corpus.speakrs']", "'speakrs' -> 'speakers'"]),
    "compare option typo": ("  profile: v100", "  profle: v100", ["['compare.profle']", "'profle' -> 'profile'"]),
    "experiment key typo": ("\nwarmup:", "\nwarmup:\n  number_of_epoch: 25",
                            ["['warmup.number_of_epoch']", "'number_of_epoch' -> 'number_of_epochs'", "synth.yaml"]),
    "fl key typo": ("    local_epochs: 2\n    lr: 0.005\n    batch_size: 4\n    evaluation:",
                    "    local_epoch: 2\n    lr: 0.005\n    batch_size: 4\n    evaluation:",
                    ["cross_silo.set", "['local_epoch']", "local_epochs"]),
    "fl nested key typo": ("    clients_per_round: 8\n    evaluation:\n      server_wer_utterances:",
                           "    clients_per_round: 8\n    evaluation:\n      server_wer_utterance:",
                           ["cross_device.set", "['evaluation.server_wer_utterance']",
                            "'server_wer_utterance' -> 'server_wer_utterances'"]),
    "integer as text": ("  warmup_speakers: 12 ", "  warmup_speakers: eight ",
                        ["partition.warmup_speakers must be an integer, got 'eight'"]),
    "mapping as a number": ("\npartition:", "\npartition: 3\npartition_was:", ["['partition_was']"]),
    "experiment number as text": ("  number_of_epochs: 25           # as long", "  number_of_epochs: twelve  # as long",
                                  ["central.number_of_epochs must be a number or null, got 'twelve'"]),
    "unknown silo skew": ("  skew: none ", "  skew: acent ", ["partition.skew='acent'", "'accent'"]),
    "unknown decoding": ("  decoding: beam", "  decoding: bem", ["evaluation.decoding must be one of", "'bem'"]),
}


@pytest.mark.parametrize("case", list(PIPELINE_YAML_CASES))
def test_pipeline_yaml_typo_or_wrong_type_names_file_key_and_fix(case, tmp_path):
    from fedasr.pipeline import load_pipeline_config

    old, new, expected = PIPELINE_YAML_CASES[case]
    text = (REPO / "hparams/pipeline/demo.yaml").read_text(encoding="utf-8")
    assert text.count(old) == 1 and "extends" not in text  # a complete file, read as written
    config = tmp_path / "my_pipeline.yaml"
    config.write_text(text.replace(old, new), encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_pipeline_config(config)
    message = str(err.value)
    assert message.startswith(f"{config}: ") and "Traceback" not in message
    for part in expected:
        assert part in message, (case, message)


def test_pipeline_set_override_typo_is_blamed_on_the_overrides():
    from fedasr.pipeline import DEFAULT_CONFIG, load_pipeline_config, parse_set_overrides

    with pytest.raises(ValueError, match=r"^--set overrides: unknown key\(s\) \['prepare.min_duraton'\] in prepare "
                                         r"\(did you mean 'min_duraton' -> 'min_duration'\?\); valid keys there: \[") as err:
        load_pipeline_config(DEFAULT_CONFIG, parse_set_overrides(["prepare.min_duraton=1"]))
    assert "'max_words'" in str(err.value)  # the valid keys: the keyword options of prepare_common_voice
    with pytest.raises(ValueError, match=r"demo.yaml \(with the --set overrides\): .*model 'ctc_tny' not found"):
        load_pipeline_config(DEFAULT_CONFIG, parse_set_overrides(["model=ctc_tny"]))
    assert load_pipeline_config(DEFAULT_CONFIG, parse_set_overrides(["central.dev_max_utterances=null"]))


def test_experiment_number_given_as_text_is_an_error(tmp_path):
    from fedasr.models.hparams import HparamsError, compose_yaml, load_experiment

    overlay = tmp_path / "my_fr.yaml"
    overlay.write_text(f"extends: {REPO / 'hparams/CommonVoice/synth.yaml'}\nnumber_of_epochs: three\n", encoding="utf-8")
    with pytest.raises(HparamsError, match="number_of_epochs must be a number or null, got 'three'") as err:
        compose_yaml(overlay)
    assert str(overlay) in str(err.value)
    with pytest.raises(HparamsError, match=r"synth.yaml: lr must be a number or null, got 'fast'"):
        load_experiment(REPO / "hparams/CommonVoice/synth.yaml", ["--lr=fast", f"--output_folder={tmp_path}"])


def test_cli_pipeline_yaml_typo_exits_2_before_any_stage(tmp_path, capsys):
    text = (REPO / "hparams/pipeline/demo.yaml").read_text(encoding="utf-8")
    config = tmp_path / "my_pipeline.yaml"
    config.write_text(text.replace("  decoding: beam", "  decodng: beam"), encoding="utf-8")  # read at stage 5 of 8
    code, err = cli(["pipeline", str(tmp_path / "out"), "--config", str(config)], capsys)
    assert code == 2
    assert str(config) in err and "['evaluation.decodng']" in err and "'decodng' -> 'decoding'" in err
    assert "valid keys there: ['decoding']" in err
    assert not (tmp_path / "out").exists()  # refused before the first stage


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory):
    """A real seed checkpoint folder of ctc_tiny (untrained weights, real normaliser statistics and tokenizer)."""
    import torch

    from fedasr.models.checkpoint import export_checkpoint
    from fedasr.models.hparams import load_experiment
    from fedasr.models.model import build_acoustic_model
    from fedasr.models.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("ckpt")
    exp = load_experiment(REPO / "hparams/CommonVoice/synth.yaml",
                          [f"--output_folder={root}", f"--manifest_folder={root}", "--model=ctc_tiny"])
    model = build_acoustic_model(exp.hparams, source="ctc_tiny")
    model.train()
    model(torch.randn(2, 16000) * 0.1, torch.ones(2), epoch=1)  # the normaliser's statistics
    tokenizer = train_tokenizer(SENTENCES * 5, root / "tok" / "tokenizer.model", vocab_size=30)
    meta = {"model": exp.model_name, "vocab_size": exp.hparams["vocab_size"], "tokenizer_vocab_size": tokenizer.vocab_size}
    return export_checkpoint(root / "seed_checkpoint", state_dict=model.state_dict(), tokenizer_path=tokenizer.model_path,
                             resolved_yaml=exp.resolved_yaml, meta=meta)


def copy_checkpoint(seed: Path, dest: Path) -> Path:
    shutil.copytree(seed, dest)
    return dest


def test_seed_checkpoint_with_weights_of_another_model_is_refused(seed_checkpoint, small_pipeline_inputs, tmp_path,
                                                                  capsys):
    import torch

    from fedasr.models.checkpoint import CheckpointMismatchError
    from fedasr.models.system import SpeechBrainASRSystem

    SpeechBrainASRSystem.from_checkpoint(seed_checkpoint)  # the folder as exported loads
    mixed = copy_checkpoint(seed_checkpoint, tmp_path / "mixed")
    state = torch.load(mixed / "model.ckpt", weights_only=True)
    state["roles.ctc_head.w.weight"] = torch.zeros(64, state["roles.ctc_head.w.weight"].shape[1])  # vocab 64
    state["roles.ctc_head.w.bias"] = torch.zeros(64)
    torch.save(state, mixed / "model.ckpt")
    with pytest.raises(CheckpointMismatchError) as err:
        SpeechBrainASRSystem.from_checkpoint(mixed)
    message = str(err.value)
    assert str(mixed / "model.ckpt") in message and str(mixed / "hyperparams.yaml") in message  # both sides
    assert "roles.ctc_head.w.weight: (64, " in message and "output_neurons=40" in message
    assert "do not mix files of different runs" in message

    code, err_text = cli(["evaluate", str(mixed), str(tmp_path / "test.csv"), "--decoding", "greedy"], capsys)
    assert code == 2 and "does not fit the model" in err_text
    code, err_text = cli(["federate", str(REPO / "hparams/fl/cross_silo.yaml"), "--partition",
                          str(small_pipeline_inputs / "p"), "--seed-checkpoint", str(mixed),
                          "--output-dir", str(tmp_path / "fl")], capsys)
    assert code == 2 and "does not fit the model" in err_text
    assert not (tmp_path / "fl").exists()  # refused before the simulation starts


def test_seed_checkpoint_with_another_tokenizer_is_refused(seed_checkpoint, tmp_path):
    from fedasr.models.checkpoint import CheckpointMismatchError
    from fedasr.models.system import SpeechBrainASRSystem
    from fedasr.models.tokenizer import train_tokenizer

    other = copy_checkpoint(seed_checkpoint, tmp_path / "other_tokenizer")
    train_tokenizer(["des mots tout autres", "rien de commun ici"] * 5, other / "tokenizer.model", vocab_size=30)
    with pytest.raises(CheckpointMismatchError, match="is not the tokenizer the weights were trained with") as err:
        SpeechBrainASRSystem.from_checkpoint(other)
    assert str(other / "tokenizer.model") in str(err.value) and str(other / "meta.json") in str(err.value)

    too_big = copy_checkpoint(seed_checkpoint, tmp_path / "big_tokenizer")
    train_tokenizer([" ".join(SENTENCES)] * 50 + SENTENCES * 20, too_big / "tokenizer.model", vocab_size=60)
    with pytest.raises(CheckpointMismatchError, match=r"tokens but the model .* outputs only 40 units"):
        SpeechBrainASRSystem.from_checkpoint(too_big)


def test_train_central_refuses_to_resume_another_models_checkpoints(tmp_path, capsys):
    import speechbrain as sb

    from fedasr.models.hparams import load_experiment
    from fedasr.models.model import build_acoustic_model

    out = tmp_path / "run"
    exp = load_experiment(REPO / "hparams/CommonVoice/synth.yaml",
                          [f"--output_folder={out}", f"--manifest_folder={tmp_path}", "--model=ctc_tiny"])
    sb.utils.checkpoints.Checkpointer(out / "save", {"model": build_acoustic_model(exp.hparams)}).save_checkpoint()
    (out / "hyperparams.yaml").write_text(exp.resolved_yaml, encoding="utf-8")  # the earlier run's record

    code, err = cli(["train-central", str(REPO / "hparams/CommonVoice/synth.yaml"), "--model=ctc_tiny",
                     "--vocab_size=64", f"--output_folder={out}", f"--manifest_folder={tmp_path}"], capsys)
    assert code == 2
    assert str(out / "save") in err and "model.ckpt does not fit the model built from" in err
    assert "roles.ctc_head.w.weight: (40, " in err and "in another --output_folder" in err
    assert (out / "hyperparams.yaml").read_text(encoding="utf-8") == exp.resolved_yaml  # nothing overwritten


# ---------------------------------------------------------------------------------------------- output folders


def test_probe_failing_for_lack_of_space_says_so(tmp_path, monkeypatch):
    import errno

    import fedasr.utils.preflight as preflight

    def full_disk_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(preflight.os, "fsync", full_disk_fsync)  # where delayed allocation failures surface
    with pytest.raises(preflight.OutputFolderError, match="its disk is full .*Free some space"):
        preflight.check_writable(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # the probe is gone


def _unwritable_folder(tmp_path: Path, kind: str) -> Path:
    if kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root ignores permissions; the 'under a file' case covers root")
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked / "out"
    (tmp_path / "file.txt").write_text("a file, not a folder\n")
    return tmp_path / "file.txt" / "out"


@pytest.fixture(scope="module")
def small_pipeline_inputs(tmp_path_factory, seed_checkpoint):
    """A release, its manifests and a partition: the inputs of every stage that writes a results folder."""
    root = tmp_path_factory.mktemp("stages")
    clips = {f"{i}.mp3": (0.5, 48000, 1) for i in range(8)}
    cv = make_release(root / "cv", [row(f"spk{i % 4}", f"{i}.mp3", SENTENCES[i]) for i in range(8)], clips)
    for split in ("dev", "test"):
        (cv / f"{split}.tsv").write_text(HEADER + "\n" + row("spk9", "0.mp3", SENTENCES[0]) + "\n", encoding="utf-8")
    prepare_common_voice(cv, root / "m", lang="fr", workers=1)
    from fedasr.data.partition import partition_manifest

    partition_manifest(root / "m", root / "p", mode="cross-silo", clients=2, warmup_speakers=1)
    shutil.copytree(seed_checkpoint, root / "seed")
    return root


STAGE_COMMANDS = {
    "prepare": lambda r, out: ["prepare", str(r / "cv"), str(out), "--lang", "fr", "--workers", "1"],
    "partition": lambda r, out: ["partition", str(r / "m"), str(out), "--mode", "cross-silo", "--clients", "2",
                                 "--warmup-speakers", "1"],
    "train-central": lambda r, out: ["train-central", str(REPO / "hparams/CommonVoice/synth.yaml"), "--model=ctc_tiny",
                                     f"--output_folder={out}", f"--manifest_folder={r / 'm'}"],
    "federate": lambda r, out: ["federate", str(REPO / "hparams/fl/cross_silo.yaml"), "--partition", str(r / "p"),
                                "--seed-checkpoint", str(r / "seed"), "--output-dir", str(out)],
    "demo": lambda r, out: ["demo", str(out)],
}


@pytest.mark.parametrize("kind", ["read-only", "under a file", "disk full"])
@pytest.mark.parametrize("stage", list(STAGE_COMMANDS))
def test_unwritable_or_full_output_folder_fails_fast(stage, kind, small_pipeline_inputs, tmp_path, capsys,
                                                     monkeypatch):
    import fedasr.utils.preflight as preflight

    if kind == "disk full":
        out = tmp_path / "out"
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=5 * preflight.MIB))
    else:
        out = _unwritable_folder(tmp_path, kind)
    code, err = cli(STAGE_COMMANDS[stage](small_pipeline_inputs, out), capsys)
    assert code == 2
    assert str(out) in err
    if kind == "disk full":
        assert "only 5.0 MiB free" in err and "Free some space or choose a folder on another disk" in err
        assert sorted(p.name for p in out.iterdir()) == []  # nothing written, the probe removed
    else:
        assert "is not writable" in err and "Choose a folder you can write to" in err
