"""Atomic writes: a result file is readable by colleagues as far as the user's umask allows (not mkstemp's 0600)."""

import os
import stat

import pytest

from fedasr.utils.io import atomic_write_json, atomic_write_text


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, expected):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.md", "WER 12.3 %\n")
        atomic_write_json(tmp_path / "summary.json", {"best_test_wer": 0.123})
    finally:
        os.umask(previous)
    for name in ("report.md", "summary.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert (tmp_path / "report.md").read_text() == "WER 12.3 %\n"
    assert os.umask(previous) == previous  # the process umask is left as it was
