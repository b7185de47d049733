"""Common Voice preparation on a hand-made release folder with real mp3 clips (written by soundfile)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import fedasr.data.commonvoice as commonvoice
from fedasr.cli import main as cli_main
from fedasr.data.commonvoice import CommonVoiceFormatError, CommonVoiceNotFoundError, prepare_common_voice
from fedasr.data.manifest import COLUMNS, read_manifest
from fedasr.data.normalize import UnsupportedLanguageError
from fedasr.utils.io import done_marker

REPO = Path(__file__).resolve().parents[2]
NEW_HEADER = "client_id path sentence_id sentence sentence_domain up_votes down_votes age gender accents variant locale segment"
OLD_HEADER = "client_id path sentence up_votes down_votes age gender accent"
CLIP_SECONDS = {"a.mp3": 1.0, "b.mp3": 2.0, "c.mp3": 0.5, "d.mp3": 3.0}


def new_row(client, path, sentence, accents=""):
    return "\t".join([client, path, "sid", sentence, "", "2", "0", "twenties", "female_feminine", accents, "", "fr", ""])


def old_row(client, path, sentence, accent=""):
    return "\t".join([client, path, sentence, "2", "0", "thirties", "male", accent])


def write_tsv(path, header, rows):
    path.write_text(header.replace(" ", "\t") + "\n" + "\n".join(rows) + "\n\n", encoding="utf-8")


def write_sine_mp3(path, seconds, rate=48000):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32"), rate, format="MP3")


def build_release(root: Path) -> Path:
    """A Common Voice folder: new-layout train.tsv, old-layout dev/test.tsv, good and bad clips."""
    clips = root / "clips"
    clips.mkdir(parents=True)
    for name, seconds in CLIP_SECONDS.items():
        write_sine_mp3(clips / name, seconds)
    (clips / "corrupt.mp3").write_bytes(np.random.default_rng(0).bytes(4000))
    (clips / "empty.mp3").write_bytes(b"")
    write_tsv(
        root / "train.tsv",
        NEW_HEADER,
        [
            new_row("spk1", "a.mp3", '"Bonjour" dit-il.', accents="France"),  # line 2
            new_row("spk1", "b.mp3", "L’homme est là aujourd‘hui."),  # line 3
            new_row("spk2", "c.mp3", "Il a 3 chats."),  # line 4: contains_digits
            new_row("spk2", "d.mp3", " ... ! "),  # line 5: empty_transcript
            new_row("spk3", "missing.mp3", "Une phrase."),  # line 6: missing_clip
            new_row("spk3", "corrupt.mp3", "Une autre phrase."),  # line 7: unreadable_clip
            new_row("spk3", "empty.mp3", "Encore une phrase."),  # line 8: empty_clip
            "spk4\tx.mp3\tonly three fields",  # line 9: malformed_row
            new_row("spk1", "a.mp3", "Encore le même clip."),  # line 10: duplicate_clip
        ],
    )
    write_tsv(
        root / "dev.tsv",
        OLD_HEADER,
        [
            old_row("spk5", "d.mp3", "Qu`il vienne jusqu´à nous !", accent="belgique"),
            old_row("spk1", "c.mp3", "Oui, peut-être."),  # spk1 is also in train
        ],
    )
    write_tsv(
        root / "test.tsv",
        OLD_HEADER,
        [
            old_row("spk7", "b.mp3", '"Vraiment ? dit-elle.'),  # unbalanced quote: CSV quoting would eat the rest
            old_row("spk6", "a.mp3", "« Peut-être » demain."),
        ],
    )
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return build_release(tmp_path_factory.mktemp("cv") / "fr")


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare_common_voice(release, out, lang="fr", workers=1)


def by_id(folder, split):
    return {u.ID: u for u in read_manifest(Path(folder) / f"{split}.csv")}


def test_manifests_hold_kept_rows_with_normalised_transcripts(release, prepared):
    out, _ = prepared
    train = by_id(out, "train")
    assert list(train) == ["a", "b"]
    assert train["a"].wrd == "bonjour dit-il"  # the quoted sentence survived (no quote processing)
    assert train["b"].wrd == "l'homme est là aujourd'hui"  # curly apostrophes -> one ASCII apostrophe
    assert train["a"].spk_id == "spk1" and train["a"].accents == "France" and train["a"].age == "twenties"
    assert train["a"].gender == "female_feminine"
    assert train["b"].duration == pytest.approx(2.0, abs=0.05)
    assert Path(train["a"].wav).is_absolute() and Path(train["a"].wav) == release.resolve() / "clips" / "a.mp3"

    dev = by_id(out, "dev")  # old layout: `accent` column
    assert dev["d"].wrd == "qu'il vienne jusqu'à nous" and dev["d"].accents == "belgique"
    assert dev["c"].duration == pytest.approx(0.5, abs=0.05)
    test = by_id(out, "test")
    assert test["b"].wrd == "vraiment dit-elle" and test["a"].wrd == "peut-être demain"

    with open(out / "train.csv", newline="", encoding="utf-8") as handle:
        assert tuple(next(csv.reader(handle))) == COLUMNS


def test_report_counts_every_skip_by_reason(prepared):
    out, report = prepared
    train = report["splits"]["train"]
    assert train["rows_read"] == 9
    assert train["kept"] == 2
    assert train["speakers_kept"] == 1
    assert train["hours_kept"] == pytest.approx(3.0 / 3600, abs=1e-4)
    assert train["skipped"] == {
        "malformed_row": 1,
        "duplicate_clip": 1,
        "empty_transcript": 1,
        "contains_digits": 1,
        "missing_clip": 1,
        "empty_clip": 1,
        "unreadable_clip": 1,
    }
    assert report["splits"]["dev"]["kept"] == 2 and report["splits"]["dev"]["skipped_total"] == 0
    assert report["speakers_in_several_splits"] == 1  # spk1: train and dev; reported, kept
    assert report["skipped_total"] == 7
    assert report["normalizer"]["lang"] == "fr" and report["filters"]["keep_digits"] is False
    assert report["input_fingerprint"]["tsvs"]["train"]["size"] > 0
    assert report["clips_per_second"] > 0 and report["status"] == "prepared"
    assert (out / "prepare_report.json").exists()


def test_skipped_log_names_split_line_clip_and_reason(prepared):
    out, _ = prepared
    lines = (out / "skipped.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "split\tline\tclip\treason"
    assert set(lines[1:]) == {
        "train\t9\tx.mp3\tmalformed_row",
        "train\t4\tc.mp3\tcontains_digits",
        "train\t5\td.mp3\tempty_transcript",
        "train\t6\tmissing.mp3\tmissing_clip",
        "train\t7\tcorrupt.mp3\tunreadable_clip",
        "train\t8\tempty.mp3\tempty_clip",
        "train\t10\ta.mp3\tduplicate_clip",
    }


def test_malformed_row_is_named_in_the_log_with_file_and_line(release, tmp_path, caplog):
    prepare_common_voice(release, tmp_path, lang="fr", workers=1, splits=("train",))
    assert f"{release.resolve() / 'train.tsv'}:9" in caplog.text


def test_second_run_does_no_work_and_force_redoes(release, tmp_path):
    first = prepare_common_voice(release, tmp_path, lang="fr", workers=1)
    outputs = sorted(tmp_path.iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in outputs}

    again = prepare_common_voice(release, tmp_path, lang="fr", workers=1)
    assert again["status"] == "up_to_date"
    assert again["splits"] == first["splits"]
    assert {p: p.stat().st_mtime_ns for p in sorted(tmp_path.iterdir())} == mtimes

    (tmp_path / "dev.csv").unlink()  # a lost output is redone
    assert prepare_common_voice(release, tmp_path, lang="fr", workers=1)["status"] == "prepared"
    assert (tmp_path / "dev.csv").exists()

    forced = prepare_common_voice(release, tmp_path, lang="fr", workers=1, force=True)
    assert forced["status"] == "prepared"
    assert (tmp_path / "train.csv").stat().st_mtime_ns != mtimes[tmp_path / "train.csv"]


def test_changed_options_redo_the_work(release, tmp_path):
    prepare_common_voice(release, tmp_path, lang="fr", workers=1)
    report = prepare_common_voice(release, tmp_path, lang="fr", keep_digits=True)
    assert report["status"] == "prepared"
    assert report["workers"] == 1  # default: no process pool for a corpus smaller than one chunk of rows
    assert by_id(tmp_path, "train")["c"].wrd == "il a 3 chats"


def test_duration_and_word_filters(release, tmp_path):
    report = prepare_common_voice(
        release, tmp_path, lang="fr", workers=1, min_duration=0.8, max_duration=2.5, min_words=3, max_words=4
    )
    dev = report["splits"]["dev"]["skipped"]
    assert dev == {"too_few_words": 1, "too_long": 1}  # "oui peut-être" has 2 words; d.mp3 lasts 3 s
    assert report["splits"]["test"]["skipped"] == {"too_few_words": 2}
    train = by_id(tmp_path, "train")  # line 2 "bonjour dit-il" has 2 words, so line 10's a.mp3 is no duplicate
    assert list(train) == ["b", "a"] and train["a"].wrd == "encore le même clip"
    report = prepare_common_voice(release, tmp_path, lang="fr", workers=1, min_duration=0.8, splits=("dev",))
    assert report["splits"]["dev"]["skipped"] == {"too_short": 1}  # c.mp3 lasts 0.5 s


def test_a_failure_midway_leaves_no_partial_outputs(release, tmp_path, monkeypatch):
    calls = []

    def failing_read_duration(path):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk vanished")
        return 1.0, None, "48000 Hz, 1 ch"

    monkeypatch.setattr(commonvoice, "read_duration", failing_read_duration)
    with pytest.raises(RuntimeError):
        prepare_common_voice(release, tmp_path, lang="fr", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no manifest, log, report or done marker


def test_pool_of_workers_gives_the_same_outputs(release, prepared, tmp_path):
    out, serial = prepared
    parallel = prepare_common_voice(release, tmp_path, lang="fr", workers=2)
    assert parallel["workers"] == 2
    assert parallel["splits"] == serial["splits"]
    for split in ("train", "dev", "test"):
        assert (tmp_path / f"{split}.csv").read_text() == (out / f"{split}.csv").read_text()
    assert sorted((tmp_path / "skipped.tsv").read_text().splitlines()) == sorted(
        (out / "skipped.tsv").read_text().splitlines()
    )


def test_missing_required_column_names_file_column_and_columns_found(release, tmp_path):
    cv = tmp_path / "cv"
    (cv / "clips").mkdir(parents=True)
    write_tsv(cv / "train.tsv", "client_id path text", ["spk1\ta.mp3\tbonjour"])
    with pytest.raises(CommonVoiceFormatError) as err:
        prepare_common_voice(cv, tmp_path / "out", lang="fr", splits=("train",))
    message = str(err.value)
    assert str(cv / "train.tsv") in message and "'sentence'" in message and "'text'" in message


def test_missing_folder_or_split_is_a_clear_error(release, tmp_path):
    with pytest.raises(CommonVoiceNotFoundError, match="Common Voice folder not found"):
        prepare_common_voice(tmp_path / "nowhere", tmp_path / "out", lang="fr")
    with pytest.raises(CommonVoiceNotFoundError, match=r"validated\.tsv.*dev\.tsv"):
        prepare_common_voice(release, tmp_path / "out", lang="fr", splits=("validated",))


def test_unknown_language_is_an_error_before_any_work(release, tmp_path):
    with pytest.raises(UnsupportedLanguageError, match="--generic-normalizer"):
        prepare_common_voice(release, tmp_path / "out", lang="xx")
    assert not (tmp_path / "out").exists()
    report = prepare_common_voice(release, tmp_path / "out", lang="xx", generic_normalizer=True, workers=1)
    assert report["normalizer"]["generic"] is True and done_marker(tmp_path / "out", "prepare_commonvoice").exists()


def test_old_releases_listing_clips_without_extension(tmp_path):
    cv = tmp_path / "cv"
    (cv / "clips").mkdir(parents=True)
    write_sine_mp3(cv / "clips" / "old.mp3", 1.0)
    write_tsv(cv / "train.tsv", OLD_HEADER, [old_row("spk1", "old", "Salut.")])
    report = prepare_common_voice(cv, tmp_path / "out", lang="fr", workers=1, splits=("train",))
    assert report["splits"]["train"]["kept"] == 1
    assert by_id(tmp_path / "out", "train")["old"].wav.endswith("old.mp3")


def test_cli_prepare_on_missing_folder_exits_2_with_message(tmp_path, capsys):
    assert cli_main(["prepare", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--lang", "fr"]) == 2
    err = capsys.readouterr().err
    assert "fedasr prepare: error:" in err and str(tmp_path / "nowhere") in err


def test_data_prep_script_runs_end_to_end(release, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "data_prep" / "prepare_commonvoice.py"), str(release), str(tmp_path),
         "--lang", "fr", "--workers", "1", "--splits", "dev"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    dev_row = next(line.split() for line in result.stdout.splitlines() if line.startswith("dev "))
    assert dev_row[1:3] == ["2", "2"]  # rows read, kept
    assert len(read_manifest(tmp_path / "dev.csv")) == 2
    missing = subprocess.run(
        [sys.executable, str(REPO / "data_prep" / "prepare_commonvoice.py"), str(tmp_path / "nowhere"),
         str(tmp_path / "o"), "--lang", "fr"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60,
    )
    assert missing.returncode == 2 and "Common Voice folder not found" in missing.stderr
