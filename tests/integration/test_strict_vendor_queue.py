"""Requests that insist on one vendor (``X-Enforce-Strategy``) and wait in the fleet queue are
answered as soon as no agent of that vendor can serve them any more (the last one left), as a new
such request is: not when another vendor's copy of the model unloads, for another vendor's runner
never takes them from the queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload, until

pytestmark = pytest.mark.integration

MODEL = "llama3.2"
AMD_ONLY = {"X-Load-Balancing-Strategy": "amd", "X-Enforce-Strategy": "true"}


@pytest.fixture
async def fleet(nats_server: NatsServer, root: str) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        # nvidia, amd: two slots each, the model warm on both; replies as long as num_predict lets them
        sims=default_sims(2, time_scale=0.05, reply_tokens=(100_000, 100_000)),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0, "drain_grace_s": 60.0},
        gateway={"queue_timeout_s": 120.0},  # far past the test's bound: an answer is not the deadline
        registry=None,
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


async def test_queued_requests_pinned_to_a_vendor_whose_last_agent_left_are_answered_404(
    fleet: LocalFleet,
) -> None:
    amd = next(a for a in fleet.agents if a.settings.vendor == "amd")
    assert fleet.gateway is not None
    view = fleet.gateway.fleet
    long = {"model": MODEL, "prompt": "a long story", "options": {"num_predict": 100_000}}
    short = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    async with aiohttp.ClientSession() as s:
        running = [await s.post(fleet.url + "/api/generate", json=long, headers=AMD_ONLY) for _ in range(2)]
        for r in running:
            assert r.status == 200 and await r.content.readline()  # both amd slots stream
        waiting = [
            asyncio.create_task(s.post(fleet.url + "/api/generate", json=short, headers=AMD_ONLY))
            for _ in range(4)
        ]
        queue = fleet.gateway.planner.queue
        await until(fleet, lambda: sum(queue._waiting.values()) >= 4, what="the four in the fleet queue")
        stopping = asyncio.create_task(amd.stop())  # drains: it takes nothing more
        await until(fleet, lambda: (a := view.get(amd.id)) is None or a.status != "active")
        for r in running:
            r.close()  # the streams' clients leave: the draining agent has nothing left and leaves
        await stopping
        await until(fleet, lambda: view.get(amd.id) is None, what="the amd agent gone")
        async with asyncio.timeout(30):  # the nvidia runner stays warm for minutes: not its unload
            answers = [await t for t in waiting]
        for r in answers:
            assert r.status == 404, await r.text()
            assert (await r.json())["error"] == "model 'llama3.2' not found on any amd agent"
