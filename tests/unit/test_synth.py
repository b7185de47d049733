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
