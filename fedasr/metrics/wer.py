"""Word and character error rates as SUMS of edits over SUMS of reference tokens, never averages of rates.

An utterance contributes its edit counts; a speaker, a demographic group, a client or a whole test set is the sum
of its utterances' counts. This is the aggregation the paper's WER (and SpeechBrain's ErrorRateStats) uses.

Word errors are split into insertions, deletions and substitutions, and :func:`alignments_text` writes each
utterance's word alignment in SpeechBrain's ``wer.txt`` format. Counts and alignments come from one aligner,
SpeechBrain's ``edit_distance`` (the one its recipes' WER uses): a minimal edit sequence is not unique ("a b" ->
"b c" is 1 deletion + 1 insertion or 2 substitutions), and one aligner keeps the split in ``wer_report.json``
and the marks in ``wer.txt`` the same.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

from speechbrain.utils.edit_distance import accumulatable_wer_stats, alignment, count_ops, op_table

GROUP_COLUMNS = ("spk_id", "gender", "age", "accents")


@dataclass
class ErrorCounts:
    """Edit counts of one or many utterances; ``wer``/``cer`` are fractions (errors / reference tokens)."""

    word_errors: int = 0
    words: int = 0
    char_errors: int = 0
    chars: int = 0
    utterances: int = 0
    insertions: int = 0  # word_errors = insertions + deletions + substitutions (rows written before: all 0)
    deletions: int = 0
    substitutions: int = 0

    def add(self, other: "ErrorCounts") -> "ErrorCounts":
        self.word_errors += other.word_errors
        self.words += other.words
        self.char_errors += other.char_errors
        self.chars += other.chars
        self.utterances += other.utterances
        self.insertions += other.insertions
        self.deletions += other.deletions
        self.substitutions += other.substitutions
        return self

    @property
    def wer(self) -> float:
        return _rate(self.word_errors, self.words)

    @property
    def cer(self) -> float:
        return _rate(self.char_errors, self.chars)

    def as_dict(self) -> dict:
        return {**asdict(self), "wer": self.wer, "cer": self.cer}


def _rate(errors: int, tokens: int) -> float:
    if tokens == 0:
        return 0.0 if errors == 0 else float("inf")
    return errors / tokens


def _edits(ref: Sequence[str], hyp: Sequence[str]) -> int:
    stats = accumulatable_wer_stats([list(ref)], [list(hyp)])
    return int(stats["insertions"] + stats["deletions"] + stats["substitutions"])


def _word_alignment(ref_words: Sequence[str], hyp_words: Sequence[str]) -> tuple[dict, list]:
    """({"insertions", "deletions", "substitutions"}, [(op, ref index, hyp index)]) of one minimal word alignment;
    op is SpeechBrain's "=", "I", "D" or "S"."""
    table = op_table(list(ref_words), list(hyp_words))
    ops = count_ops(table)
    return {k: int(ops[k]) for k in ("insertions", "deletions", "substitutions")}, alignment(table)


def utterance_counts(ref: str, hyp: str) -> ErrorCounts:
    """Word edits (Levenshtein over words; insertions, deletions, substitutions) and character edits (over
    characters, spaces included)."""
    ref_words, hyp_words = ref.split(), hyp.split()
    ref_chars, hyp_chars = " ".join(ref_words), " ".join(hyp_words)
    ops, _ = _word_alignment(ref_words, hyp_words)
    return ErrorCounts(
        word_errors=sum(ops.values()),
        words=len(ref_words),
        char_errors=_edits(ref_chars, hyp_chars),
        chars=len(ref_chars),
        utterances=1,
        **ops,
    )


def total_counts(counts: Iterable[ErrorCounts]) -> ErrorCounts:
    total = ErrorCounts()
    for c in counts:
        total.add(c)
    return total


def utterance_row(utt_id: str, ref: str, hyp: str, **fields: str) -> dict:
    """One per-utterance record: ID, ref, hyp, the edit counts, plus any grouping fields (spk_id, gender, ...)."""
    counts = utterance_counts(ref, hyp)
    return {
        "ID": utt_id,
        **fields,
        "ref": ref,
        "hyp": hyp,
        "errors": counts.word_errors,
        "words": counts.words,
        "char_errors": counts.char_errors,
        "chars": counts.chars,
        "insertions": counts.insertions,
        "deletions": counts.deletions,
        "substitutions": counts.substitutions,
    }


def row_counts(row: Mapping) -> ErrorCounts:
    """The counts of one per-utterance row (a row of hyps.tsv has no character or ins/del/sub counts: 0 there)."""
    return ErrorCounts(int(row["errors"]), int(row["words"]), int(row.get("char_errors") or 0),
                       int(row.get("chars") or 0), 1, int(row.get("insertions") or 0), int(row.get("deletions") or 0),
                       int(row.get("substitutions") or 0))


def counts_by(rows: Iterable[Mapping], column: str) -> dict[str, ErrorCounts]:
    """Sum the per-utterance counts of ``rows`` for each value of ``column`` (empty values become "unknown")."""
    groups: dict[str, ErrorCounts] = defaultdict(ErrorCounts)
    for row in rows:
        groups[str(row.get(column) or "unknown")].add(row_counts(row))
    return dict(sorted(groups.items()))


def error_report(rows: Sequence[Mapping], group_columns: Sequence[str] = GROUP_COLUMNS) -> dict:
    """JSON-ready report: overall counts and WER/CER, then the same per value of each grouping column."""
    report = {"overall": total_counts(row_counts(r) for r in rows).as_dict(), "groups": {}}
    for column in group_columns:
        if any(column in r for r in rows):
            report["groups"][column] = {k: v.as_dict() for k, v in counts_by(rows, column).items()}
    return report


def format_report(report: Mapping) -> str:
    """A plain-text table of an :func:`error_report`: WER/CER in percent, then the word insertions, deletions and
    substitutions (summed over the utterances: ins + del + sub = WER x words)."""
    lines = [f"{'group':<12} {'value':<28} {'utts':>6} {'words':>7} {'WER%':>7} {'CER%':>7} {'ins':>6} {'del':>6} "
             f"{'sub':>6}"]

    def line(group: str, value: str, c: Mapping) -> str:
        return (f"{group:<12} {value[:28]:<28} {c['utterances']:>6} {c['words']:>7} {100 * c['wer']:>7.2f} "
                f"{100 * c['cer']:>7.2f} {c.get('insertions', 0):>6} {c.get('deletions', 0):>6} "
                f"{c.get('substitutions', 0):>6}")

    lines.append(line("all", "-", report["overall"]))
    for column, values in report.get("groups", {}).items():
        for value, c in values.items():
            lines.append(line(column, value, c))
    return "\n".join(lines)


def alignments_text(rows: Iterable[Mapping]) -> str:
    """SpeechBrain's ``wer.txt``: the overall ``%WER`` line (summed edits over summed reference words), then for
    each utterance its id, its ``%WER x.xx [ e / n, i ins, d del, s sub ]`` line and its reference, edit marks and
    hypothesis aligned word by word (``=`` correct, ``S`` substituted, ``D`` deleted, ``I`` inserted; ``<eps>``:
    no word on that side). ``rows``: per-utterance rows with ``ID``, ``ref`` and ``hyp`` (e.g. of hyps.tsv).
    """
    from speechbrain.dataio.wer import print_alignments, print_wer_summary

    details, total, erroneous = [], ErrorCounts(), 0
    for row in rows:
        ref_words, hyp_words = str(row.get("ref") or "").split(), str(row.get("hyp") or "").split()
        ops, aligned = _word_alignment(ref_words, hyp_words)
        edits = sum(ops.values())
        total.add(ErrorCounts(edits, len(ref_words), utterances=1, **ops))
        erroneous += edits > 0
        details.append({"key": str(row["ID"]), "scored": True, "hyp_absent": False, "hyp_empty": not hyp_words,
                        "num_edits": edits, "num_ref_tokens": len(ref_words),
                        "WER": 100 * _rate(edits, len(ref_words)), **ops, "alignment": aligned,
                        "ref_tokens": ref_words, "hyp_tokens": hyp_words})
    summary = {"WER": 100 * total.wer, "num_edits": total.word_errors, "num_scored_tokens": total.words,
               "insertions": total.insertions, "deletions": total.deletions, "substitutions": total.substitutions,
               "num_scored_sents": total.utterances, "num_ref_sents": total.utterances, "num_absent_sents": 0,
               "num_erroneous_sents": erroneous, "SER": 100 * _rate(erroneous, total.utterances)}
    buffer = io.StringIO()
    print_wer_summary(summary, file=buffer)
    print_alignments(details, file=buffer)
    return buffer.getvalue()


def speaker_bootstrap(runs: Mapping[str, Sequence[Mapping]], reference: str | None = None, *, resamples: int = 2000,
                      seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Percentile intervals of each run's WER, and of its WER over ``reference``'s, by resampling speakers.

    ``runs``: per-utterance rows (spk_id, errors, words) of each run on the SAME test set. Each resample draws
    the test speakers with replacement (utterances of one speaker stay together: they are not independent) and
    recomputes every run's WER as summed errors over summed words on that draw; the ratio uses the same draw for
    both runs (a paired bootstrap), so what the two runs share cancels out. Returns
    ``{run: {"wer": (lo, hi), "ratio": (lo, hi) or None}}``.
    """
    import numpy as np

    if not runs:
        return {}
    per_run = {name: counts_by(rows, "spk_id") for name, rows in runs.items()}
    speakers = sorted(set().union(*(set(c) for c in per_run.values())))
    if not speakers:
        return {name: {"wer": None, "ratio": None} for name in runs}
    errors = {n: np.array([c[s].word_errors if s in c else 0 for s in speakers], float) for n, c in per_run.items()}
    words = {n: np.array([c[s].words if s in c else 0 for s in speakers], float) for n, c in per_run.items()}
    draws = np.random.default_rng(seed).integers(0, len(speakers), size=(resamples, len(speakers)))
    counts = np.stack([np.bincount(d, minlength=len(speakers)) for d in draws])  # times each speaker is drawn
    wer = {n: (counts @ errors[n]) / np.maximum(counts @ words[n], 1.0) for n in runs}
    tail = 100 * (1 - level) / 2

    def interval(values) -> tuple[float, float]:
        lo, hi = np.percentile(values, [tail, 100 - tail])
        return float(lo), float(hi)

    result = {}
    for name in runs:
        ratio = None
        if reference is not None and reference in wer and name != reference:
            ratio = interval(wer[name] / np.maximum(wer[reference], 1e-12))
        result[name] = {"wer": interval(wer[name]), "ratio": ratio}
    return result
