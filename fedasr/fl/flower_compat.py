"""Where fedasr and Flower 1.42 meet outside the apps: the one notice ``fedasr federate`` silences, and Flower's own
console handler, which ``fedasr federate`` mutes so that Flower's lines are not printed twice.

``fedasr federate`` runs the ServerApp and the ClientApp with ``flwr.simulation.run_simulation``, which Flower 1.42
reports as deprecated on every call ("Please use `flwr run` in the CLI instead"). Its replacement, ``flwr run`` on
a local simulation SuperLink, is supported by fedasr too (README: As a Flower app), but it cannot replace the
in-process call behind ``fedasr federate``:

- the ServerApp runs in another process (a detached ``flower-superlink`` -> ``flwr-simulation``), so the server's
  model, built and checked against the seed before Ray starts, cannot be handed to it, nor the validated run;
- ``flwr run`` exits 0 when the ServerApp fails (it only submits the run), so ``fedasr federate`` could no longer
  exit non-zero with the cause, which the pipeline's stages and the recipes rely on;
- it leaves a SuperLink running that someone must stop, and reads the user's $FLWR_HOME connections.

Flower 1.42 has no other public in-process entry point (``_run_simulation``, which ``run_simulation`` wraps, is
private). So fedasr keeps ``run_simulation`` and drops exactly its deprecation record, nothing else Flower logs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

_FLOWER_LOGGER = "flwr"
_NOTICE = "The `run_simulation` function is deprecated"


class _DropRunSimulationNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to judge
            return True
        return not (text.startswith("DEPRECATED FEATURE") and _NOTICE in text)


@contextlib.contextmanager
def without_run_simulation_notice() -> Iterator[None]:
    """Silence Flower's deprecation notice of ``run_simulation`` (only it) while the block runs."""
    logger = logging.getLogger(_FLOWER_LOGGER)
    notice_filter = _DropRunSimulationNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)


class _WhenPropagating(logging.Filter):
    """Drops every record while the ``flwr`` logger propagates: the root's handlers show (or file) it already."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.logger.propagate


@contextlib.contextmanager
def without_flower_console() -> Iterator[None]:
    """Flower's records only through the root logger's handlers while the block runs.

    Flower 1.42 gives its ``flwr`` logger a console handler of its own (colored, level INFO) and lets records
    propagate to the root too: with logging configured (``fedasr`` configures the root), every Flower line is
    printed twice. Here its console handlers print nothing while the logger propagates; where Flower turns
    propagation off itself (``run_simulation`` under a running asyncio loop, e.g. a notebook) they print as before.
    """
    from flwr.common.logger import ConsoleHandler

    logger = logging.getLogger(_FLOWER_LOGGER)
    muted = []
    for handler in logger.handlers:
        if isinstance(handler, ConsoleHandler):
            handler_filter = _WhenPropagating(logger)
            handler.addFilter(handler_filter)
            muted.append((handler, handler_filter))
    try:
        yield
    finally:
        for handler, handler_filter in muted:
            handler.removeFilter(handler_filter)
