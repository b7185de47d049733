"""Per-language transcript normalisation for Common Voice sentences.

Every normaliser applies, in this order:

1. Unicode NFC (composed accents, so "é" is one code point whatever the source).
2. Apostrophe variants (’ ‘ ` ´ ʼ ′ ʹ ＇ ‛ ...) -> ASCII ``'``; hyphen variants (‐ ‑ ‒ −) -> ASCII ``-``.
3. Lower-casing with ``str.lower`` (not ``casefold``: German "ß" stays "ß").
4. Punctuation and symbols (Unicode categories P*, S*, C*, Z*) become spaces; letters, combining marks and
   digits are kept. Apostrophes and hyphens follow the per-language rules below.
5. Optional accent stripping (NFD, drop combining marks, NFC): "été" -> "ete".
6. Whitespace collapsed to single spaces, no leading/trailing space.

Apostrophes (all languages): an apostrophe between two letters is kept, so elisions and contractions stay one
token whatever apostrophe the speaker typed: fr "l'homme", "aujourd'hui", "qu'il", "jusqu'à"; it "l'uomo",
"dell'anno"; en "don't", "it's". Quotes around words ('hello') are removed.
- fr: an elided article or pronoun written with a space after the apostrophe is re-attached: "l' homme" ->
  "l'homme".
- it: a word-final apostrophe after a letter is kept, because it is spelling: "po'", "mo'" (un po' di pane).
- en, de, es and the generic normaliser: word-final apostrophes are dropped ("students'" -> "students").

Hyphens inside words (letter-hyphen-letter):
- fr, de: kept; the compound stays one token ("peut-être", "dit-il", "grand-mère"; "E-Mail",
  "Baden-Württemberg"), as written in the language's orthography.
- en, it, es and the generic normaliser: replaced by a space ("well-known" -> "well known").
Hyphens anywhere else (dashes, leading or trailing hyphens) are punctuation and removed.

Digits are kept by the normaliser; :func:`contains_digits` lets the caller drop such sentences (their spoken
form is ambiguous).

Script: fr, it, en, de and es are written in the Latin script. :meth:`Normalizer.foreign_letters` returns the
letters of a normalised sentence that are not Latin (a Russian or Chinese sentence in a French release, a
Greek letter), so the caller can skip it instead of teaching the tokenizer symbols the language does not use.
The generic normaliser has no script rule.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Callable

APOSTROPHE_VARIANTS = "\u2019\u2018\u201b\u0060\u00b4\u02bc\u02b9\u02bb\u02bd\u2032\u2035\uff07\u055a\ua78c"
HYPHEN_VARIANTS = "\u2010\u2011\u2012\u2212\ufe63\uff0d"

_CHAR_MAP = str.maketrans({**{c: "'" for c in APOSTROPHE_VARIANTS}, **{c: "-" for c in HYPHEN_VARIANTS}})

# Placeholders (private-use code points) protect kept apostrophes/hyphens while punctuation is removed.
_KEEP_APOSTROPHE = "\ue000"
_KEEP_HYPHEN = "\ue001"
# Invisible format characters (soft hyphen, zero-width space/joiners, BOM) are deleted, not turned into spaces.
_INVISIBLE = re.compile("[\u00ad\u200b-\u200d\u2060\ufeff]")
# Anything that is not a letter, mark, digit or protected placeholder becomes a space.
_NOT_WORD_CHAR = re.compile("[^\\w\ue000\ue001]|_")
_APOSTROPHE_BETWEEN_LETTERS = re.compile(r"(?<=[^\W\d_])'(?=[^\W\d_])")
_HYPHEN_BETWEEN_WORD_CHARS = re.compile(r"(?<=[^\W_])-(?=[^\W_])")
_WORD_FINAL_APOSTROPHE = re.compile(r"(?<=[^\W\d_])'(?=\s|$)")
_FRENCH_ELISION_WITH_SPACE = re.compile(
    r"\b(l|d|j|m|n|s|t|c|qu|jusqu|lorsqu|puisqu|quoiqu|presqu)' +(?=[^\W\d_])"
)
_DIGIT = re.compile(r"\d")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class NormalizerRules:
    """What differs between languages."""

    keep_intraword_hyphen: bool
    keep_word_final_apostrophe: bool = False
    reattach_french_elision: bool = False
    script: str | None = "LATIN"  # Unicode script of the letters (the prefix of their Unicode names); None: any


LANGUAGE_RULES: dict[str, NormalizerRules] = {
    "fr": NormalizerRules(keep_intraword_hyphen=True, reattach_french_elision=True),
    "it": NormalizerRules(keep_intraword_hyphen=False, keep_word_final_apostrophe=True),
    "en": NormalizerRules(keep_intraword_hyphen=False),
    "de": NormalizerRules(keep_intraword_hyphen=True),
    "es": NormalizerRules(keep_intraword_hyphen=False),
}
GENERIC_RULES = NormalizerRules(keep_intraword_hyphen=False, script=None)
# Letters used in Latin-script text whose Unicode names do not start with "LATIN": Spanish/Italian ordinal
# indicators ("1ª", "nº").
_LATIN_EXTRAS = frozenset("ªº")
SUPPORTED_LANGUAGES = tuple(sorted(LANGUAGE_RULES))


class UnsupportedLanguageError(ValueError):
    """A language without its own normalisation rules was asked for without the generic opt-in."""


def strip_accents(text: str) -> str:
    """Remove combining diacritics: "Ça été" -> "Ca ete" (letters such as "ß", "œ" are unchanged)."""
    decomposed = unicodedata.normalize("NFD", text)
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if not unicodedata.combining(c)))


def contains_digits(text: str) -> bool:
    """True when the text holds any decimal digit (any script)."""
    return _DIGIT.search(text) is not None


@functools.lru_cache(maxsize=4096)
def _letter_in_script(char: str, script: str) -> bool:
    """True for a non-letter, or a letter of ``script``."""
    if not unicodedata.category(char).startswith("L") or char in _LATIN_EXTRAS:
        return True
    return unicodedata.name(char, "").startswith(script)


def normalize_text(text: str, rules: NormalizerRules, *, remove_accents: bool = False) -> str:
    """Normalise one sentence with the given rules (see the module docstring for the steps)."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFC", text)).translate(_CHAR_MAP).lower()
    if rules.reattach_french_elision:
        text = _FRENCH_ELISION_WITH_SPACE.sub(r"\1'", text)
    text = _APOSTROPHE_BETWEEN_LETTERS.sub(_KEEP_APOSTROPHE, text)
    if rules.keep_word_final_apostrophe:
        text = _WORD_FINAL_APOSTROPHE.sub(_KEEP_APOSTROPHE, text)
    hyphen_replacement = _KEEP_HYPHEN if rules.keep_intraword_hyphen else " "
    text = _HYPHEN_BETWEEN_WORD_CHARS.sub(hyphen_replacement, text)
    text = _NOT_WORD_CHAR.sub(" ", text.replace("'", " ").replace("-", " "))
    text = text.replace(_KEEP_APOSTROPHE, "'").replace(_KEEP_HYPHEN, "-")
    if remove_accents:
        text = strip_accents(text)
    return _SPACES.sub(" ", text).strip()


class Normalizer:
    """A picklable callable ``str -> str`` for one language (so it can travel to worker processes)."""

    def __init__(self, lang: str, rules: NormalizerRules, *, strip_accents: bool = False, generic: bool = False):
        self.lang = lang
        self.rules = rules
        self.strip_accents = strip_accents
        self.generic = generic

    def __call__(self, text: str) -> str:
        return normalize_text(text, self.rules, remove_accents=self.strip_accents)

    def foreign_letters(self, text: str) -> str:
        """The letters of ``text`` outside the language's script, sorted ("" when all fit, or with no rule)."""
        script = self.rules.script
        if script is None or text.isascii():
            return ""
        return "".join(sorted({c for c in text if not _letter_in_script(c, script)}))

    def settings(self) -> dict:
        """The settings that determine the output (for reports and fingerprints)."""
        return {"lang": self.lang, "generic": self.generic, "strip_accents": self.strip_accents, **asdict(self.rules)}

    def __repr__(self) -> str:
        return f"Normalizer({self.settings()})"


def get_normalizer(lang: str, strip_accents: bool = False, generic: bool = False) -> Normalizer:
    """The normaliser for ``lang`` (fr, it, en, de, es); ``generic=True`` allows any other language.

    A language code with a region ("fr-FR", "en_GB") uses its base language's rules.
    """
    base = lang.strip().lower().replace("_", "-").split("-")[0]
    if base in LANGUAGE_RULES:
        return Normalizer(base, LANGUAGE_RULES[base], strip_accents=strip_accents, generic=False)
    if generic:
        return Normalizer(lang, GENERIC_RULES, strip_accents=strip_accents, generic=True)
    raise UnsupportedLanguageError(
        f"no text normalisation rules for language {lang!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}. "
        "To use the generic rules (NFC, lower-casing, punctuation removal, apostrophes kept inside words), "
        "pass --generic-normalizer (generic_normalizer=True)."
    )


NormalizerFn = Callable[[str], str]
