"""Dotted ``KEY=VALUE`` overrides and nested merging: the one implementation for every `--set` option."""

from __future__ import annotations

import yaml


def parse_dotted_overrides(pairs: list[str] | None, example: str = "--set rounds=3") -> dict:
    """``["strategy.temperature=0.05", "rounds=3"]`` -> nested dict; values parsed as YAML scalars.

    A pair without ``=`` or with an empty key is a ``ValueError`` naming the pair and showing ``example``.
    """
    nested: dict = {}
    for pair in pairs or []:
        key, eq, raw = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"override {pair!r} is not KEY=VALUE (e.g. {example})")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
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
