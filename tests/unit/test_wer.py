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
