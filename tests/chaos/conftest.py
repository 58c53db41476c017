"""Chaos fixtures shared by several tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from corral.runtime.natsserver import NatsServer, free_port


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server of this test's own, on a fixed port and store, so the test may kill it and
    start it again where its clients find it (a module's own `server` fixture takes its place)."""
    async with NatsServer(port=free_port(), store_dir=tmp_path / "js") as s:
        yield s
