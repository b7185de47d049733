"""Atomic file writes and done-markers: outputs appear complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, durable: bool = True, **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it is renamed over ``path`` (atomic on POSIX).

    On an exception the temporary file is removed and ``path`` is left untouched. ``durable=False`` skips the
    fsync: still atomic for a crashed process, for many small files that a later durable write commits.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; results are shared as open() would share them
    os.close(fd)
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def done_marker(out_dir: str | os.PathLike, stage: str) -> Path:
    """Path of the marker file written when ``stage`` finished in ``out_dir``."""
    return Path(out_dir) / f".done.{stage}.json"


def is_done(out_dir: str | os.PathLike, stage: str, fingerprint: dict) -> bool:
    """True when ``stage`` already finished in ``out_dir`` with exactly this fingerprint of its inputs."""
    marker = done_marker(out_dir, stage)
    if not marker.exists():
        return False
    try:
        return read_json(marker) == fingerprint
    except (OSError, ValueError):
        return False


def mark_done(out_dir: str | os.PathLike, stage: str, fingerprint: dict) -> None:
    atomic_write_json(done_marker(out_dir, stage), fingerprint)
