"""A service's metrics port (`corral.runtime.metricsserver.metrics_served`): served for the life of
its block on a real socket, closed when the block ends however it ends, absent when off."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from corral.runtime.metricsserver import metrics_served
from corral.runtime.natsserver import free_port
from prometheus_client import CollectorRegistry, Counter

pytestmark = pytest.mark.integration


async def test_port_zero_serves_nothing() -> None:
    async with metrics_served(CollectorRegistry(), 0) as server:
        assert server is None


async def test_the_registry_is_served_while_the_block_runs_and_closed_after_an_error() -> None:
    registry = CollectorRegistry()
    Counter("corral_test_things", "things", registry=registry).inc(3)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with pytest.raises(RuntimeError):
        async with metrics_served(registry, port) as server, aiohttp.ClientSession() as s:
            assert server is not None
            async with s.get(url) as r:
                assert r.status == 200
                assert "corral_test_things_total 3.0" in await r.text()
            raise RuntimeError("the service failed")
    with pytest.raises(OSError):  # closed: nothing listens any more
        await asyncio.open_connection("127.0.0.1", port)
