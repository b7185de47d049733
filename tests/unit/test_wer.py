"""WER/CER aggregation: sums of edits over sums of reference words, never averages of per-utterance rates."""

import json

import pytest

from fedasr.metrics.wer import (
    ErrorCounts,
    counts_by,
    error_report,
    format_report,
    total_counts,
    utterance_counts,
    utterance_row,
)


def test_utterance_counts_of_known_strings():
    c = utterance_counts("le chat mange une pomme", "le chien mange pomme")
    assert (c.word_errors, c.words) == (2, 5)  # one substitution, one deletion
    c = utterance_counts("a b", "a b c d")
    assert (c.word_errors, c.words) == (2, 2)  # two insertions: WER above 100 % is possible
    assert c.wer == pytest.approx(1.0)
    c = utterance_counts("abc", "abd")
    assert (c.char_errors, c.chars) == (1, 3)


def test_empty_hypothesis_counts_every_reference_word_as_deleted():
    c = utterance_counts("un deux trois", "")
    assert (c.word_errors, c.words) == (3, 3)


def test_total_sums_errors_and_words_not_rates():
    short = utterance_counts("oui", "non")  # 1 / 1 = 100 %
    long = utterance_counts("un deux trois quatre cinq six sept huit neuf", "un deux trois quatre cinq six sept huit neuf")
    total = total_counts([short, long])
    assert (total.word_errors, total.words, total.utterances) == (1, 10, 2)
    assert total.wer == pytest.approx(0.1)  # the mean of per-utterance WERs would be 0.5


def test_group_report_sums_per_speaker_and_per_gender():
    rows = [
        utterance_row("u1", "a b c d", "a b c x", spk_id="s1", gender="female", age="", accents=""),
        utterance_row("u2", "a b", "a b", spk_id="s1", gender="female", age="", accents=""),
        utterance_row("u3", "a b c d e", "", spk_id="s2", gender="male", age="", accents=""),
    ]
    by_speaker = counts_by(rows, "spk_id")
    assert by_speaker["s1"].word_errors == 1 and by_speaker["s1"].words == 6
    assert by_speaker["s2"].wer == pytest.approx(1.0)
    report = error_report(rows)
    assert report["overall"]["word_errors"] == 6 and report["overall"]["words"] == 11
    assert report["groups"]["gender"]["female"]["wer"] == pytest.approx(1 / 6)
    assert report["groups"]["age"]["unknown"]["utterances"] == 3  # empty demographic values are grouped, not dropped
    json.dumps(report)  # JSON-ready
    table = format_report(report)
    assert "s2" in table and "100.00" in table


def test_rate_of_no_reference_words():
    assert ErrorCounts().wer == 0.0
    assert ErrorCounts(word_errors=2).wer == float("inf")


def test_speaker_bootstrap_resamples_speakers_and_pairs_the_ratio():
    from fedasr.metrics.wer import speaker_bootstrap

    def rows(errors_by_speaker):  # 20 utterances of 10 words per speaker
        return [{"ID": f"{spk}-{i}", "spk_id": spk, "errors": errors, "words": 10}
                for spk, errors in errors_by_speaker.items() for i in range(20)]

    speakers = {f"s{k}": k % 6 for k in range(12)}  # per-speaker WER 0 % .. 50 %
    central = rows(speakers)
    federated = rows({spk: errors + 1 for spk, errors in speakers.items()})  # one more error everywhere
    intervals = speaker_bootstrap({"central": central, "fl": federated, "same": central}, "central", seed=3)
    lo, hi = intervals["central"]["wer"]
    assert lo < 0.25 < hi and hi - lo > 0.1  # the point estimate (0.25) inside; 12 speakers leave a wide interval
    assert intervals["same"]["ratio"] == (1.0, 1.0) and intervals["central"]["ratio"] is None
    ratio_lo, ratio_hi = intervals["fl"]["ratio"]
    # The two runs' WER intervals overlap, yet the paired ratio interval is far from 1: a real difference shows.
    assert intervals["fl"]["wer"][0] < hi and 1.2 < ratio_lo < 0.35 / 0.25 < ratio_hi < 1.7
    # Utterances of one speaker move together: two speakers at 0 % and 100 % give an interval spanning both.
    split = speaker_bootstrap({"run": rows({"a": 0, "b": 10})}, None, seed=0)["run"]["wer"]
    assert split[0] == 0.0 and split[1] == 1.0


# ---- insertions / deletions / substitutions and the per-utterance alignments (issue 15) -----------------------------

REF, HYP = "the cat sat on the mat", "the cat sit on mat today"  # sat -> sit (S), the (D), today (I)


def test_word_errors_split_into_insertions_deletions_substitutions():
    c = utterance_counts(REF, HYP)
    assert (c.insertions, c.deletions, c.substitutions, c.word_errors, c.words) == (1, 1, 1, 3, 6)
    c = utterance_counts("le chat mange une pomme", "le chien mange pomme")
    assert (c.insertions, c.deletions, c.substitutions) == (0, 1, 1)
    assert utterance_counts("a b", "a b c d").insertions == 2 and utterance_counts("un deux", "").deletions == 2
    rows = [utterance_row("u1", REF, HYP, spk_id="s1", gender="female"),
            utterance_row("u2", "a b", "", spk_id="s2", gender="male"),
            utterance_row("u3", "x y", "x y z", spk_id="s2", gender="male")]
    assert {k: rows[0][k] for k in ("insertions", "deletions", "substitutions")} == {
        "insertions": 1, "deletions": 1, "substitutions": 1}
    report = error_report(rows)
    overall = report["overall"]
    # Summed over utterances, like word_errors: 1+0+1 ins, 1+2+0 del, 1+0+0 sub = 6 errors over 10 words.
    assert (overall["insertions"], overall["deletions"], overall["substitutions"]) == (2, 3, 1)
    assert overall["word_errors"] == 6 and overall["wer"] == pytest.approx(0.6)
    male = report["groups"]["gender"]["male"]
    assert (male["insertions"], male["deletions"], male["substitutions"], male["word_errors"]) == (1, 2, 0, 3)
    table = format_report(report).splitlines()
    assert table[0].split()[-3:] == ["ins", "del", "sub"]
    assert table[1].split() == ["all", "-", "3", "10", "60.00", table[1].split()[5], "2", "3", "1"]
    json.dumps(report)


def test_rows_without_the_split_still_count(tmp_path):
    """hyps.tsv keeps its columns (no ins/del/sub): compare's rows read back from it still sum their errors."""
    from fedasr.models.evaluate import hyps_tsv
    from fedasr.report.compare import read_hyps

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "hyps.tsv").write_text(hyps_tsv([utterance_row("u1", REF, HYP, spk_id="s1")]))
    rows = read_hyps(tmp_path)
    assert "insertions" not in rows[0]
    by_speaker = counts_by(rows, "spk_id")["s1"]
    assert (by_speaker.word_errors, by_speaker.words, by_speaker.insertions) == (3, 6, 0)


def test_alignments_text_is_speechbrains_wer_txt():
    from fedasr.metrics.wer import alignments_text

    text = alignments_text([utterance_row("u1", REF, HYP), utterance_row("u2", "a b", "")])
    assert text.startswith("%WER 62.50 [ 5 / 8, 1 ins, 3 del, 1 sub ]\n")  # summed over the two utterances
    u1 = text[text.index("u1, "):text.index("=" * 80, text.index("u1, "))].splitlines()
    assert [line.rstrip() for line in u1] == [
        "u1, %WER 50.00 [ 3 / 6, 1 ins, 1 del, 1 sub ]",
        "the ; cat ; sat ; on ;  the  ; mat ; <eps>",
        " =  ;  =  ;  S  ; =  ;   D   ;  =  ;   I",
        "the ; cat ; sit ; on ; <eps> ; mat ; today",
    ]
    u2 = text[text.index("u2, "):].splitlines()
    assert u2[0] == "u2, %WER 100.00 [ 2 / 2, 0 ins, 2 del, 0 sub ]" and u2[2].split(";") == ["  D   ", "   D  "]


def test_evaluate_writes_the_split_and_the_alignments_beside_hyps(tmp_path, monkeypatch):
    import fedasr.models.evaluate as evaluate

    rows = [utterance_row("u1", REF, HYP, spk_id="s1", gender="female", age="", accents=""),
            utterance_row("u2", "a b", "", spk_id="s2", gender="male", age="", accents="")]

    class FakeSystem:  # decoding is not what is tested here: the files written from its rows are
        meta, device, precision = {"model": "fake"}, "cpu", "fp32"

        @classmethod
        def from_checkpoint(cls, checkpoint_dir, device="cpu", precision="fp32"):
            return cls()

        def transcribe_manifest(self, manifest, decoding="beam", max_utterances=None):
            return rows, 0.5

    monkeypatch.setattr(evaluate, "SpeechBrainASRSystem", FakeSystem)
    (tmp_path / "seed").mkdir()
    out = tmp_path / "run" / "eval"
    report = evaluate.evaluate_checkpoint(tmp_path / "seed", "test.csv", out_dir=out, device="cpu")
    saved = json.loads((out / "wer_report.json").read_text())
    overall = saved["overall"]
    assert (overall["insertions"], overall["deletions"], overall["substitutions"]) == (1, 3, 1)
    assert saved["groups"]["spk_id"]["s2"]["deletions"] == 2 and report["overall"] == saved["overall"]
    assert "ins" in (out / "wer_report.txt").read_text()
    alignments = (out / "wer.txt").read_text()
    assert "u1, %WER 50.00 [ 3 / 6, 1 ins, 1 del, 1 sub ]" in alignments and "<eps> ; mat ; today" in alignments
    assert (out / "hyps.tsv").read_text().splitlines()[0].split("\t") == list(evaluate.HYPS_COLUMNS)
    from fedasr.report.compare import read_hyps

    assert [r["ID"] for r in read_hyps(tmp_path / "run")] == ["u1", "u2"]
