"""Fixtures of the unit tests that run the real server loop and ClientApp training function with fakes."""

from __future__ import annotations

import pytest

FAKE_CLIENTS = 12


@pytest.fixture
def fake_clients(monkeypatch):
    """A partition of :data:`FAKE_CLIENTS` clients whose manifests the fake ASR system (fl_fakes.FakeASR) reads
    by name only, a Flower task identity, and a ClientApp system cache emptied before and after."""
    from fedasr.fl import client_app
    from fl_fakes import set_task_identity

    set_task_identity(monkeypatch)
    clients = tuple({"train": f"client-{i}/train.csv", "valid": f"client-{i}/valid.csv"} for i in range(FAKE_CLIENTS))
    monkeypatch.setattr(client_app, "partition_clients", lambda partition: clients)
    client_app.cached_system.cache_clear()
    yield clients
    client_app.cached_system.cache_clear()
