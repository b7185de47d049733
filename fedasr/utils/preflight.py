"""Check an output folder before a long stage starts, so a read-only folder or a full disk fails in seconds with a
clear message instead of after hours of training.

:func:`check_writable` creates the folder, writes, fsyncs and deletes a probe file in it (the only reliable test:
permissions, read-only mounts, quotas and ACLs all show up there), then compares the free space with what the
stage needs: a floor for logs and manifests plus the caller's estimate of its checkpoints
(:func:`space_for_parameters`, :func:`space_for_copies`).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

MIB = 1 << 20
MIN_FREE_BYTES = 64 * MIB  # logs, manifests, metrics, reports: what every stage writes besides checkpoints
BYTES_PER_PARAMETER = 12  # one checkpoint: float32 weights + Adam's two float32 moments
PROBE_NAME = ".fedasr_write_probe"


class OutputFolderError(OSError):
    """An output folder that cannot be written or lacks free space; the message names the folder and the fix."""


def space_for_parameters(modules, copies: int) -> int:
    """Bytes of ``copies`` checkpoints of the torch ``modules`` (weights + optimizer moments each)."""
    return BYTES_PER_PARAMETER * int(copies) * sum(p.numel() for m in modules for p in m.parameters())


def space_for_copies(model_file: str | os.PathLike, copies: int) -> int:
    """Bytes of ``copies`` x ``model_file`` (0 when it is missing: its own loader reports that, more clearly)."""
    try:
        return int(copies) * os.path.getsize(model_file)
    except OSError:
        return 0


def check_writable(folder: str | os.PathLike, need_bytes: int = 0, *, what: str = "output folder") -> Path:
    """Create ``folder``, prove it is writable with a probe file, and require ``MIN_FREE_BYTES + need_bytes`` free.

    Returns the folder. Raises :class:`OutputFolderError` naming the folder, the cause and the fix.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f"{PROBE_NAME}.{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"fedasr write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as err:
        cause = f"{err.strerror or err}: {err.filename or folder}"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputFolderError(
                f"{what} {folder}: its disk is full ({cause}). Free some space or choose a folder on another disk."
            ) from None
        raise OutputFolderError(
            f"{what} {folder} is not writable ({cause}). Choose a folder you can write to, or fix its permissions "
            "(e.g. `chmod u+w`), before the stage starts."
        ) from None
    needed = MIN_FREE_BYTES + max(0, int(need_bytes))
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputFolderError(
            f"{what} {folder}: only {free / MIB:.1f} MiB free on its disk, this stage needs at least "
            f"{needed / MIB:.1f} MiB (checkpoints, logs, manifests). Free some space or choose a folder on another "
            "disk."
        )
    return folder
