"""Settings helpers shared by every loader: dotted ``KEY=VALUE`` overrides (every `--set` option), nested merging,
and the one check of keys and value types (unknown key -> "did you mean", the file and the valid keys)."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging



OVERRIDE_RULE = (
    "Every fedasr command that reads a settings YAML (train-central, federate, demo/pipeline) takes "
    "--set KEY=VALUE, repeatable: KEY is a key of that YAML, dotted where the YAML nests (--set "
    "strategy.temperature=0.05); VALUE is a YAML value (3, 0.5, true, null, [a, b], {k: v}); a key given twice "
    "keeps the later value; an unknown key is an error naming the closest valid one."
)


def read_value(text: str):
    """One command-line value, read as HyperPyYAML reads the settings files (YAML 1.2: ``1e-3`` is a number, ``no``
    and ``on`` stay words); ``""`` stays ``""``."""
    import ruamel.yaml

    return ruamel.yaml.YAML(typ="safe", pure=True).load(text) if text != "" else ""


def parse_dotted_overrides(pairs: list[str] | None, example: str = "--set rounds=3", load=read_value) -> dict:
    """``["strategy.temperature=0.05", "rounds=3"]`` -> nested dict; values parsed as YAML scalars by ``load``.

    The one parser of every ``--set KEY=VALUE`` option (see :data:`OVERRIDE_RULE`). ``load``: the reader of a value
    (:func:`read_value`, YAML 1.2 as HyperPyYAML reads the files, for every command: ``--set lr=1e-3`` is the number
    in federate, the pipeline and train-central alike, and equals SpeechBrain's ``--lr=1e-3``). A key given twice keeps the later value, also
    when one of the two is a dotted key below the other (``a=1`` then ``a.b=2`` -> ``{"a": {"b": 2}}``). A pair
    without ``=``, with an empty key or key part, or with a value that is not YAML is a ``ValueError`` naming the pair
    and showing ``example``.
    """
    nested: dict = {}
    for pair in pairs or []:
        key, eq, raw = pair.partition("=")
        parts = [part.strip() for part in key.split(".")]
        if not eq or not all(parts):
            raise ValueError(f"override {pair!r} is not KEY=VALUE (e.g. {example})")
        try:
            value = load(raw)
        except Exception as err:  # noqa: BLE001 - each YAML library raises its own error types
            problem = getattr(err, "problem", None) or err  # PyYAML's and ruamel's errors: the short reason
            raise ValueError(f"override {pair!r}: {raw!r} is not a YAML value ({problem}; e.g. {example})") from None
        node = nested
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # a value given earlier for the section itself: the later, dotted one wins
            node = node[part]
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, nested mappings merged key by key (inputs are not modified)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ---- checking a settings mapping against the keys and types its reader expects -----------------------------------

class SettingsError(ValueError):
    """A settings file or override with an unknown key, a missing key or a value of the wrong type.

    The message names the file (or the overrides), the key with its section, the fix and the valid keys."""


Schema = dict  # key -> expected type, tuple of types, None (any value) or a nested Schema


def did_you_mean(unknown, valid) -> str:
    """``" (did you mean 'partiton' -> 'partition'?)"`` for keys close to a valid one (difflib), else ``""``."""
    valid = [str(v) for v in valid]
    guesses = [f"{key!r} -> {match[0]!r}" for key in unknown
               if (match := difflib.get_close_matches(str(key), valid, n=1))]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def check_settings(values, schema: Schema, *, source: str, section: str = "", complete: bool = True,
                   fix: str = "", error: type[ValueError] = SettingsError) -> None:
    """Raise ``error`` (the loader's own error class) unless ``values`` is a mapping with the keys of ``schema``.

    Checked: unknown keys (with a "did you mean"), missing keys when ``complete``, and each value's type (a nested
    ``Schema`` is checked as a mapping of its own). ``source`` names where the values come from (the file, or
    "--set overrides"), ``section`` the dotted prefix of the keys (``"partition."``) and ``fix`` what to do.
    Checking before any work matters: a stage reads its settings only when it starts, maybe hours into a run.
    """
    where = section.rstrip(".") or "the top level"
    hint = f" {fix}" if fix else ""
    if not isinstance(values, dict):
        raise error(f"{source}: {where} must be a mapping of `key: value` lines, got {values!r}.{hint}")
    valid = sorted(schema)
    unknown = sorted(str(key) for key in set(values) - set(schema))
    if unknown:
        raise error(f"{source}: unknown key(s) {[section + k for k in unknown]} in {where}"
                    f"{did_you_mean(unknown, valid)}; valid keys there: {valid}.{hint}")
    missing = [key for key in schema if key not in values] if complete else []
    if missing:
        raise error(f"{source}: missing key(s) {[section + k for k in missing]} in {where}.{hint}")
    for key, value in values.items():
        expected = schema[key]
        if isinstance(expected, dict):
            check_settings(value, expected, source=source, section=f"{section}{key}.", complete=complete, fix=fix,
                           error=error)
        elif expected is not None and not _fits(value, expected):
            raise error(f"{source}: {section}{key} must be {_type_names(expected)}, got {value!r}.{hint}")


def _fits(value, expected) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):  # YAML's true/false are not numbers here
        return bool in types
    if float in types and isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as text; float() takes it
        try:
            float(value)
            return True
        except ValueError:
            pass
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "text", bool: "true or false", dict: "a mapping",
               list: "a list", type(None): "null"}


def _type_names(expected) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def schema_from_signature(function, skip=()) -> Schema:
    """The keyword options of ``function`` as a Schema: the keys a YAML section passed as ``**options`` may hold.

    Annotations of int, float, bool and str (``| None`` allowed) are checked; any other annotation accepts any value.
    """
    simple = {"int": int, "float": float, "bool": bool, "str": str}
    schema: Schema = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or name in skip:
            continue
        parts = [p.strip() for p in str(parameter.annotation).split("|")]
        types = tuple(simple.get(p, type(None) if p == "None" else object) for p in parts)
        schema[name] = None if object in types else (types if len(types) > 1 else types[0])
    return schema


@contextlib.contextmanager
def quiet_logger(name: str):
    """Only errors from logger ``name`` while the block runs (e.g. Flower's notices during a trial build)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
