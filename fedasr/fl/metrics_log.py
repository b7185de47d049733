"""metrics.jsonl: the per-round record of a federated run, one JSON object per line (round 0 = the seed model).

The one reader and writer of the file: the server appends to it, ``fedasr compare`` and the demo's progress lines
read it. The file is rewritten atomically after every round, so a reader never sees half a line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedasr.utils.io import atomic_open

METRICS_FILE = "metrics.jsonl"


class MetricsFileError(ValueError):
    """A metrics.jsonl that cannot be read; the message names the file, the line and the fix."""


def read_metrics_rows(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl (empty list when the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise MetricsFileError(f"{path}, line {number}: not JSON ({err}); the file is damaged: re-run the "
                                       "federated stage with --resume (it rewrites the file from its checkpoint)") from None
    return rows


class MetricsLog:
    """The rows of one run's metrics.jsonl, kept in memory and rewritten atomically on every change."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict] = read_metrics_rows(self.path)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self._write()

    def truncate(self, last_round: int) -> None:
        """Forget rows after ``last_round`` (a killed run may have logged a round it did not checkpoint)."""
        self.rows = [r for r in self.rows if r["round"] <= last_round]
        self._write()

    def _write(self) -> None:
        with atomic_open(self.path, "w", encoding="utf-8") as handle:
            for row in self.rows:
                handle.write(json.dumps(row, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
