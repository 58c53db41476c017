"""An agent that leaves the fleet (a registry found it dead, or it stopped) ends the gateway's calls
on it at once, not when their idle timeout runs out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.integration

MODEL = "llama3.2"
IDLE_TIMEOUT_S = 30.0  # far longer than the test allows: an ending within seconds is not the timeout


@pytest.fixture
async def fleet(nats_server: NatsServer, root: str) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=0.05),
        agent={"refresh_s": 0.5, "heartbeat_s": 5.0},
        gateway={"idle_timeout_s": IDLE_TIMEOUT_S},
        registry=None,
        aggregator=None,
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


async def test_a_stream_on_an_agent_that_left_ends_with_an_error_line_at_once(fleet: LocalFleet) -> None:
    assert fleet.gateway is not None and fleet.gateway.nc is not None
    agent = fleet.agents[0]
    kv = await fleet.gateway.nc.jetstream().key_value(fleet.gateway.subjects.agents_bucket)
    body = {"model": MODEL, "prompt": "a long story", "options": {"num_predict": 100_000}}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fleet.url}/api/generate", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # tokens are flowing
            await kv.delete(agent.id)  # what a registry does to an agent it found dead
            left = time.monotonic()
            async with asyncio.timeout(10):
                lines = [line async for line in r.content]
    assert time.monotonic() - left < 3  # the key's deletion, heard through the watch: not a timeout
    last = msgspec.json.decode(lines[-1])
    assert "left the fleet" in last["error"]
