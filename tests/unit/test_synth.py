"""The synthetic Common Voice corpus: layout, speakers, sentences, determinism, idempotence, errors."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import soundfile as sf

from fedasr.data import synth
from fedasr.data.synth import (
    TSV_COLUMNS,
    SynthError,
    count_words,
    load_grammar,
    make_speakers,
    sentence_pool,
    split_sizes,
    synthesize_corpus,
)
from tests.conftest import FIXTURE_CORPUS


def read_tsv(path):
    with open(path, encoding="utf-8", newline="") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        rows = [dict(zip(header, line.rstrip("\n").split("\t"))) for line in handle]
    return header, rows


def folder_digest(folder):
    """sha256 of every file under ``folder`` (relative name -> digest)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "synth_summary.json"
    }


# ---------------------------------------------------------------------------------------------- sentences


@pytest.mark.parametrize("lang", ["fr", "en"])
def test_sentence_pool_has_3_to_8_words_no_digits_and_is_seeded(lang):
    grammar = load_grammar(lang)
    pool = sentence_pool(grammar, 300, seed=0)
    assert len(pool) == 300 and len(set(pool)) == 300
    assert all(3 <= count_words(s) <= 8 for s in pool)
    assert not any(re.search(r"\d", s) for s in pool)
    assert all(s[0].isupper() or s[0] in "«\"" for s in pool)
    assert sentence_pool(grammar, 300, seed=0) == pool
    assert sentence_pool(grammar, 300, seed=1) != pool


def test_french_material_exercises_the_normaliser():
    pool = " ".join(sentence_pool(load_grammar("fr"), 400, seed=0))
    for needle in ("l'homme", "J'ai", "aujourd'hui", "’", "«", '"', "?", "!", ":"):
        assert needle in pool, needle


def test_count_words_ignores_punctuation_marks():
    assert count_words("Le chat dit : « bonjour ! »") == 4
    assert count_words("J'ai vu l'homme.") == 3


def test_sentence_pool_stops_when_the_grammar_is_exhausted():
    tiny = synth.Grammar(classes={"A": ("le chat", "la fille")}, templates=("{A} dort ici.",))
    assert sorted(sentence_pool(tiny, 10, seed=0)) == ["La fille dort ici.", "Le chat dort ici."]


def test_unknown_language_is_a_clear_error():
    with pytest.raises(SynthError, match="choose one of"):
        load_grammar("xx")


# ---------------------------------------------------------------------------------------------- speakers


def test_split_sizes_follow_common_voice_shares():
    assert split_sizes(40) == {"train": 28, "dev": 6, "test": 6}
    assert split_sizes(3) == {"train": 1, "dev": 1, "test": 1}
    with pytest.raises(SynthError, match="at least 3 speakers"):
        split_sizes(2)


def test_eval_speakers_set_the_dev_and_test_speakers_and_bad_counts_name_the_fix():
    assert split_sizes(58, eval_speakers=15) == {"train": 28, "dev": 15, "test": 15}
    assert split_sizes(3, eval_speakers=1) == {"train": 1, "dev": 1, "test": 1}
    for bad in (0, 3):
        with pytest.raises(SynthError, match=rf"eval_speakers={bad}: .* lie in \[1, 2\] with speakers=5"):
            split_sizes(5, eval_speakers=bad)
    speakers = make_speakers("fr", 20, seed=0, eval_speakers=5)
    assert sorted(s.split for s in speakers).count("test") == 5
    assert [s.client_id for s in speakers] == [s.client_id for s in make_speakers("fr", 20, seed=0)]


def test_eval_utterances_per_speaker_shorten_dev_and_test_only():
    speakers = make_speakers("fr", 10, seed=0, eval_speakers=2)
    same = synth.plan_clips(synth.Path("c"), "fr", speakers, 4, seed=0)
    assert synth.plan_clips(synth.Path("c"), "fr", speakers, 4, seed=0, eval_per_speaker=4) == same
    jobs = synth.plan_clips(synth.Path("c"), "fr", speakers, 4, seed=0, eval_per_speaker=2)
    per_speaker = {}
    for job in jobs:
        per_speaker[job.speaker.index] = per_speaker.get(job.speaker.index, 0) + 1
    assert {s.index: per_speaker[s.index] for s in speakers} == {s.index: 4 if s.split == "train" else 2
                                                                for s in speakers}
    names = [job.path.name for job in jobs]
    assert len(set(names)) == len(jobs) == 6 * 4 + 4 * 2
    numbers = sorted(int(re.search(r"(\d+)\.mp3", n).group(1)) for n in names)
    assert numbers == list(range(numbers[0], numbers[0] + len(jobs)))  # one clip number after the other
    for s in speakers:  # a speaker never reads one sentence twice
        texts = [job.text for job in jobs if job.speaker.index == s.index]
        assert len(set(texts)) == len(texts)


def test_a_corpus_with_many_short_eval_speakers(tmp_path):
    summary = synthesize_corpus(tmp_path / "c", speakers=5, utterances_per_speaker=3, eval_speakers=2,
                                eval_utterances_per_speaker=1, workers=2)
    assert {split: (s["speakers"], s["clips"]) for split, s in summary["splits"].items()} == {
        "train": (1, 3), "dev": (2, 2), "test": (2, 2)}
    for split, clips in (("train", 3), ("dev", 2), ("test", 2)):
        _, rows = read_tsv(tmp_path / "c" / f"{split}.tsv")
        assert len(rows) == clips and all((tmp_path / "c" / "clips" / r["path"]).stat().st_size > 0 for r in rows)
    with pytest.raises(SynthError, match="other settings"):  # the options are part of the corpus's fingerprint
        synthesize_corpus(tmp_path / "c", speakers=5, utterances_per_speaker=3, eval_speakers=2)
    with pytest.raises(SynthError, match="eval_utterances_per_speaker=0"):
        synthesize_corpus(tmp_path / "d", speakers=5, eval_utterances_per_speaker=0)


def test_speakers_are_seeded_distinct_and_plausible():
    speakers = make_speakers("fr", 24, seed=0)
    assert make_speakers("fr", 24, seed=0) == speakers
    assert [s.client_id for s in make_speakers("fr", 24, seed=1)] != [s.client_id for s in speakers]
    assert all(re.fullmatch(r"[0-9a-f]{128}", s.client_id) for s in speakers)
    assert len({s.client_id for s in speakers}) == 24
    assert len({(s.voice, s.pitch, s.speed) for s in speakers}) == 24
    assert {s.gender for s in speakers} == {"male_masculine", "female_feminine"}
    for s in speakers:
        assert s.gender == ("male_masculine" if "+m" in s.voice else "female_feminine")
        assert 120 <= s.speed <= 190
    assert len({s.accent for s in speakers}) >= 2


# ---------------------------------------------------------------------------------------------- corpus


@pytest.mark.slow  # builds the session's synthetic corpus when first to ask for it
def test_fixture_corpus_has_the_common_voice_layout(synth_corpus):
    headers, rows = {}, {}
    for split in ("train", "dev", "test", "validated"):
        headers[split], rows[split] = read_tsv(synth_corpus / f"{split}.tsv")
        assert headers[split] == list(TSV_COLUMNS)
    n = FIXTURE_CORPUS["speakers"] * FIXTURE_CORPUS["utterances_per_speaker"]
    assert len(rows["validated"]) == n
    split_paths = sorted(r["path"] for s in ("train", "dev", "test") for r in rows[s])
    assert split_paths == sorted(r["path"] for r in rows["validated"])
    speakers = {s: {r["client_id"] for r in rows[s]} for s in ("train", "dev", "test")}
    assert (len(speakers["train"]), len(speakers["dev"]), len(speakers["test"])) == (14, 3, 3)
    assert not speakers["train"] & speakers["dev"] and not speakers["train"] & speakers["test"]
    assert not speakers["dev"] & speakers["test"]
    for row in rows["validated"]:
        assert re.fullmatch(r"common_voice_fr_\d+\.mp3", row["path"])
        assert row["sentence_id"] == hashlib.sha256(row["sentence"].encode()).hexdigest()
        assert row["locale"] == "fr" and row["gender"] in ("male_masculine", "female_feminine")
        assert row["age"] and row["accents"]
    shared = [s for s in {r["sentence"] for r in rows["validated"]}
              if len({r["client_id"] for r in rows["validated"] if r["sentence"] == s}) > 1]
    assert shared, "some sentences must be read by several speakers, as in Common Voice"


@pytest.mark.slow  # builds the session's synthetic corpus when first to ask for it
def test_fixture_clips_are_48k_mono_mp3_with_speech(synth_corpus):
    _, rows = read_tsv(synth_corpus / "validated.tsv")
    for row in rows[:: len(rows) // 6]:
        path = synth_corpus / "clips" / row["path"]
        info = sf.info(path)
        assert (info.format, info.samplerate, info.channels) == ("MP3", 48000, 1)
        assert 0.8 < info.duration < 8.0
        audio, _ = sf.read(path, dtype="float32")
        frame = 480  # 10 ms
        energy = np.sqrt(np.mean(audio[: len(audio) // frame * frame].reshape(-1, frame) ** 2, axis=1))
        assert energy.max() > 0.05, "speech must be audible"
        assert np.quantile(energy, 0.05) < 0.01, "pauses must be near-silent (noise is light)"


def test_synthesis_is_byte_deterministic_and_idempotent(tmp_path):
    args = {"lang": "fr", "speakers": 3, "utterances_per_speaker": 2, "seed": 7}
    first = synthesize_corpus(tmp_path / "a", workers=2, **args)
    synthesize_corpus(tmp_path / "b", workers=1, **args)
    assert first["clips"] == 6 and first["speakers"] == 3 and not first["skipped"]
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    again = synthesize_corpus(tmp_path / "a", workers=2, **args)
    assert again["skipped"] and again["clips"] == 6 and again["hours"] == first["hours"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")} == mtimes
    with pytest.raises(SynthError, match="other settings"):
        synthesize_corpus(tmp_path / "a", **{**args, "seed": 8})


def test_english_corpus_and_bad_arguments(tmp_path):
    summary = synthesize_corpus(tmp_path / "en", lang="en", speakers=3, utterances_per_speaker=1, workers=1)
    _, rows = read_tsv(tmp_path / "en" / "validated.tsv")
    assert summary["clips"] == 3 and {r["locale"] for r in rows} == {"en"}
    assert all(r["path"].startswith("common_voice_en_") for r in rows)
    with pytest.raises(SynthError, match="speakers=2"):
        synthesize_corpus(tmp_path / "x", speakers=2)
    with pytest.raises(SynthError, match="lang='xx'"):
        synthesize_corpus(tmp_path / "x", lang="xx")


def test_missing_espeak_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(synth.EspeakError, match="apt-get install espeak-ng"):
        synthesize_corpus(tmp_path, speakers=3, utterances_per_speaker=1)


# ---------------------------------------------------------------------------------------------- acoustic variety


# make_speakers("fr", 24, seed=0) before the acoustic options existed: (voice, pitch, speed, gain, noise_db, age,
# accent) of the first three speakers, and every speaker's noise level.
CLEAN_FIRST_SPEAKERS = [
    ("fr-fr+m5", 56, 147, 0.518, -47.0, "fourties", "Français de France"),
    ("fr-ch+m3", 40, 182, 0.651, -47.8, "twenties", "Français de Suisse"),
    ("fr-ch+m7", 57, 125, 0.544, -53.1, "teens", "Français de Suisse"),
]
CLEAN_NOISE_DB = [-47.0, -47.8, -53.1, -58.9, -53.0, -50.9, -47.1, -53.3, -54.7, -47.3, -52.8, -54.7, -46.4, -55.8,
                  -50.6, -57.4, -50.1, -49.2, -47.9, -52.7, -58.2, -50.3, -46.8, -54.2]


def voice_tuple(s):
    return (s.voice, s.pitch, s.speed, s.gain, s.noise_db, s.age, s.accent)


def test_clean_acoustics_draw_the_speakers_of_earlier_versions():
    clean = synth.resolve_acoustics()
    assert clean == synth.Acoustics() and clean.is_default
    assert synth.resolve_acoustics("clean", noise_db_range=[-60, -45]).is_default
    for speakers in (make_speakers("fr", 24, seed=0), make_speakers("fr", 24, seed=0, acoustics=clean)):
        assert [voice_tuple(s) for s in speakers[:3]] == CLEAN_FIRST_SPEAKERS
        assert [s.noise_db for s in speakers] == CLEAN_NOISE_DB
        assert {(s.speed_factor, s.rt60) for s in speakers} == {(1.0, 0.0)}


def test_hard_acoustics_vary_noise_speed_and_room_per_speaker_only():
    clean = make_speakers("fr", 120, seed=0)
    hard = make_speakers("fr", 120, seed=0, acoustics=synth.resolve_acoustics("hard"))
    assert [(s.voice, s.pitch, s.speed, s.gain, s.age, s.accent, s.split, s.client_id) for s in hard] == [
        (s.voice, s.pitch, s.speed, s.gain, s.age, s.accent, s.split, s.client_id) for s in clean
    ], "the acoustic options must not change who the speakers are"
    assert all(-40.0 <= s.noise_db <= -25.0 for s in hard)
    assert all(0.85 <= s.speed_factor <= 1.15 and 0.2 <= s.rt60 <= 0.8 for s in hard)
    assert len({s.speed_factor for s in hard}) > 10 and len({s.rt60 for s in hard}) > 10
    assert len({s.client_id for s in hard}) == 120 and len({s.accent for s in hard}) == 3
    assert make_speakers("fr", 120, seed=0, acoustics=synth.resolve_acoustics("hard")) == hard


def test_an_explicit_range_replaces_the_presets_and_bad_ranges_name_the_option():
    mixed = synth.resolve_acoustics("hard", reverb_rt60_range=(0, 0), noise_db_range=[-35, -30])
    assert mixed == synth.Acoustics(noise_db_range=(-35.0, -30.0), speed_range=(0.85, 1.15), reverb_rt60_range=(0, 0))
    assert synth.resolve_acoustics(speed_range=(0.9, 1.1)).reverb_rt60_range == (0.0, 0.0)
    with pytest.raises(SynthError, match=r"acoustics='loud': choose one of \['clean', 'hard'\]"):
        synth.resolve_acoustics("loud")
    with pytest.raises(SynthError, match=r"noise_db_range=\(-20, -40\): the low end must not exceed the high end"):
        synth.resolve_acoustics(noise_db_range=(-20, -40))
    with pytest.raises(SynthError, match=r"speed_range=\(0.1, 1.0\): out of range.*--speed-range 0.9 1.1"):
        synth.resolve_acoustics(speed_range=(0.1, 1.0))
    with pytest.raises(SynthError, match=r"reverb_rt60_range=0.5: give two numbers LOW HIGH"):
        synth.resolve_acoustics(reverb_rt60_range=0.5)
    with pytest.raises(SynthError, match=r"noise_db_range=\['a', 'b'\]"):
        synth.resolve_acoustics(noise_db_range=["a", "b"])


def test_speed_perturbation_and_room_response():
    tone = np.sin(2 * np.pi * 200 * np.arange(48_000) / 48_000).astype(np.float32)
    assert synth.speed_perturb(tone, 1.0) is tone
    assert abs(synth.speed_perturb(tone, 1.25).size - 48_000 / 1.25) <= 2
    assert abs(synth.speed_perturb(tone, 0.8).size - 48_000 / 0.8) <= 2

    response = synth.room_impulse_response(0.5, (0, 1, 2))
    assert response[0] == 1.0 and response.size == int(0.0025 * 48_000) + int(0.5 * 48_000)
    tail = response[int(0.0025 * 48_000):]
    assert np.isclose(np.sum(tail**2), 10 ** (-synth.REVERB_DIRECT_DB / 10))
    first, last = (np.sqrt(np.mean(tail[i : i + 2400] ** 2)) for i in (0, tail.size - 2400))
    assert 45 < 20 * np.log10(first / last) < 70, "the tail decays by about 60 dB over RT60"
    assert np.array_equal(synth.room_impulse_response(0.5, (0, 1, 2)), response)
    assert np.array_equal(synth.room_impulse_response(0.0, (0, 1, 2)), [1.0])

    click = np.zeros(1000, dtype=np.float32)
    click[0] = 1.0
    wet = synth.reverberate(click, response)
    assert wet.size == 1000 + response.size - 1 and np.allclose(wet[: response.size], response, atol=1e-6)
    assert synth.reverberate(click, np.ones(1)) is click


def noise_floor(path) -> float:
    """RMS of the quietest 10 ms frames (the 5th percentile): the noise between words."""
    audio, _ = sf.read(path, dtype="float32")
    frames = audio[: len(audio) // 480 * 480].reshape(-1, 480)
    return float(np.quantile(np.sqrt(np.mean(frames**2, axis=1)), 0.05))


def test_acoustic_options_change_the_audio_and_the_defaults_do_not(tmp_path):
    args = {"lang": "fr", "speakers": 3, "utterances_per_speaker": 1, "seed": 7, "workers": 1}
    default = synthesize_corpus(tmp_path / "default", **args)
    synthesize_corpus(tmp_path / "clean", acoustics="clean", noise_db_range=(-60, -45), **args)
    assert folder_digest(tmp_path / "default") == folder_digest(tmp_path / "clean")
    assert "acoustics" not in default

    noisy = synthesize_corpus(tmp_path / "noisy", noise_db_range=(-30, -25), **args)
    assert noisy["acoustics"]["noise_db_range"] == [-30.0, -25.0]
    hard = synthesize_corpus(tmp_path / "hard", acoustics="hard", **args)
    assert hard["acoustics"]["reverb_rt60_range"] == [0.2, 0.8]
    for folder in ("noisy", "hard"):
        assert read_tsv(tmp_path / folder / "validated.tsv") == read_tsv(tmp_path / "default" / "validated.tsv")
    clips = sorted(p.name for p in (tmp_path / "default" / "clips").iterdir())
    for name in clips:
        assert noise_floor(tmp_path / "noisy" / "clips" / name) > 5 * noise_floor(tmp_path / "default" / "clips" / name)
        assert (tmp_path / "hard" / "clips" / name).read_bytes() != (tmp_path / "default" / "clips" / name).read_bytes()
    with pytest.raises(SynthError, match="other settings"):
        synthesize_corpus(tmp_path / "default", acoustics="hard", **args)
    assert synthesize_corpus(tmp_path / "default", **args)["skipped"]


def test_cli_passes_the_acoustic_options_and_reports_bad_ones(tmp_path, monkeypatch, capsys):
    from fedasr.cli import main as cli_main

    seen = {}

    def fake(out_dir, **kwargs):
        seen.update(kwargs)
        return {"clips": 0, "hours": 0.0, "splits": {}, "seconds": 0.0, "skipped": False,
                "acoustics": synth.resolve_acoustics(kwargs["acoustics"]).as_dict()}

    monkeypatch.setattr(synth, "synthesize_corpus", fake)
    argv = ["synth", str(tmp_path), "--acoustics", "hard", "--noise-db-range", "-35", "-30",
            "--speed-range", "0.9", "1.1"]
    assert cli_main(argv) == 0
    assert seen["acoustics"] == "hard" and seen["noise_db_range"] == [-35.0, -30.0]
    assert seen["speed_range"] == [0.9, 1.1] and seen["reverb_rt60_range"] is None
    assert seen["eval_speakers"] is None and seen["eval_utterances_per_speaker"] is None
    assert cli_main(["synth", str(tmp_path), "--eval-speakers", "15", "--eval-utterances-per-speaker", "8"]) == 0
    assert seen["eval_speakers"] == 15 and seen["eval_utterances_per_speaker"] == 8
    assert "acoustics per speaker" in capsys.readouterr().out
    monkeypatch.undo()
    assert cli_main(["synth", str(tmp_path), "--noise-db-range", "-25", "-40"]) == 2
    assert "noise_db_range=[-25.0, -40.0]: the low end must not exceed the high end" in capsys.readouterr().err
