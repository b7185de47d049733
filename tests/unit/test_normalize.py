"""Per-language transcript normalisation: the words a model is trained and scored on."""

import pickle

import pytest

from fedasr.data.normalize import (
    APOSTROPHE_VARIANTS,
    SUPPORTED_LANGUAGES,
    UnsupportedLanguageError,
    contains_digits,
    get_normalizer,
)


@pytest.mark.parametrize(
    "lang, raw, expected",
    [
        # French: elisions stay one token, intra-word hyphens kept, quotes and punctuation removed.
        ("fr", '"Bonjour" dit-il.', "bonjour dit-il"),
        ("fr", "L'homme est là aujourd'hui.", "l'homme est là aujourd'hui"),
        ("fr", "Qu’il vienne jusqu’à nous !", "qu'il vienne jusqu'à nous"),
        ("fr", "L' homme, c'est « ça »…", "l'homme c'est ça"),
        ("fr", "Peut-être — oui ; -non-", "peut-être oui non"),
        ("fr", "ÉTÉ   Œuvre\tNoël", "été œuvre noël"),
        # Italian: elisions kept, word-final apostrophe is spelling ("po'"), hyphenated words split.
        ("it", "L’uomo dell’anno.", "l'uomo dell'anno"),
        ("it", "Un po' di pane, sì.", "un po' di pane sì"),
        ("it", "Nord-est", "nord est"),
        # English: contractions kept, quotes and possessive-plural apostrophes dropped, hyphens split.
        ("en", "Don’t say ‘hello’, it's the students' well-known joke.", "don't say hello it's the students well known joke"),
        # German: "ß" kept (lower, not casefold), compounds with hyphen kept.
        ("de", "Die E-Mail aus Baden-Württemberg: Straße!", "die e-mail aus baden-württemberg straße"),
        # Spanish: inverted marks removed, accents and ñ kept.
        ("es", "¿Qué pasó? ¡Año nuevo!", "qué pasó año nuevo"),
    ],
)
def test_language_rules(lang, raw, expected):
    assert get_normalizer(lang)(raw) == expected


@pytest.mark.parametrize("apostrophe", list(APOSTROPHE_VARIANTS) + ["'"])
def test_every_apostrophe_variant_gives_the_same_token(apostrophe):
    assert get_normalizer("fr")(f"l{apostrophe}homme") == "l'homme"
    assert get_normalizer("en")(f"don{apostrophe}t") == "don't"


def test_nfc_composes_decomposed_accents():
    decomposed = "e\u0301te\u0301"  # "été" as e + combining acute
    assert get_normalizer("fr")(decomposed) == "\u00e9t\u00e9"


def test_invisible_characters_do_not_split_words():
    assert get_normalizer("fr")("sou\u00adhait zero\u200bwidth") == "souhait zerowidth"


def test_strip_accents_removes_diacritics_only():
    normalize = get_normalizer("fr", strip_accents=True)
    assert normalize("Ça a été Noël, l’œuvre") == "ca a ete noel l'œuvre"
    assert get_normalizer("de", strip_accents=True)("Größe") == "große"


def test_digits_are_kept_for_the_caller_to_decide():
    assert get_normalizer("fr")("Il a 3 chats.") == "il a 3 chats"
    assert contains_digits("il a 3 chats")
    assert contains_digits("٣")  # Arabic-Indic digit
    assert not contains_digits("trois chats")


def test_punctuation_only_normalises_to_empty():
    assert get_normalizer("fr")(" ... !? — « » ") == ""


def test_unknown_language_lists_supported_ones_and_the_opt_in():
    with pytest.raises(UnsupportedLanguageError) as err:
        get_normalizer("xx")
    message = str(err.value)
    for lang in SUPPORTED_LANGUAGES:
        assert lang in message
    assert "--generic-normalizer" in message
    assert isinstance(err.value, ValueError)


def test_generic_normalizer_is_an_explicit_opt_in():
    normalize = get_normalizer("pt", generic=True)
    assert normalize("Olá, mundo! Guarda-chuva d’água") == "olá mundo guarda chuva d'água"
    assert normalize.settings()["generic"] is True


def test_region_codes_use_the_base_language_rules():
    assert get_normalizer("fr-FR")("Peut-être") == "peut-être"
    assert get_normalizer("en_GB").settings()["lang"] == "en"


def test_normalizer_is_picklable_for_worker_processes():
    normalize = pickle.loads(pickle.dumps(get_normalizer("it", strip_accents=True)))
    assert normalize("Perché l’uomo") == "perche l'uomo"
