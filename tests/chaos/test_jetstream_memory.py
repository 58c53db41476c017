"""Clients cannot take the JetStream memory the fleet's heartbeats need.

The nats-server here has a small memory store (64 MB, of which the fleet's KV buckets reserve 48
MiB). A hundred large requests (700 KB each, 70 MB together: more than the whole memory store) for a
model whose one slot is busy wait in the fleet queue, which keeps them on disk: the agent goes on
heartbeating while they wait, every request is answered 200 or 503 (never a 500), and a plain
request is served afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from corral.protocol.subjects import Subjects
from corral.runtime.nats import connect
from corral.runtime.natsserver import NatsServer, free_port
from corral.runtime.workqueue import depths
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload
from tests.integration.waits import until

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
REQUESTS = 100
PROMPT = "word " * (700 * 1024 // 5)
WITHIN_S = 30.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp_path / "js"}", max_memory_store: 64MB }}\n'
    )
    async with NatsServer(port=port, config_file=conf) as s:
        yield s


@pytest.fixture
async def fleet(server: NatsServer, root: str) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=server.url,
        root=root,
        sims=default_sims(1, time_scale=0.05),
        agent={
            "refresh_s": 0.5,
            "heartbeat_s": 2.0,
            "parallel": 1,
        },  # dead after 6 s silent: slack for a loaded CI
        gateway={"queue_timeout_s": 6.0},
        registry=None,
        aggregator=None,
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


async def test_a_flood_of_large_queued_requests_leaves_the_fleet_heartbeating(
    server: NatsServer, fleet: LocalFleet, root: str
) -> None:
    assert fleet.gateway is not None
    view = fleet.gateway.fleet
    agent = fleet.agents[0].id
    body = msgspec.json.encode({"model": MODEL, "prompt": PROMPT, "stream": False})
    nc = await connect(server.url, name="observer")
    timeout = aiohttp.ClientTimeout(total=WITHIN_S * 2)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as s:

            async def one() -> int:
                async with s.post(f"{fleet.url}/api/generate", data=body) as r:
                    await r.read()
                    return r.status

            flood = [asyncio.create_task(one()) for _ in range(REQUESTS)]
            try:

                async def queued() -> bool:
                    return sum((await depths(nc, Subjects(root))).values()) >= REQUESTS // 2

                async def paced(left: float) -> None:  # by the fleet's changes, at least every 0.5 s
                    await view.wait_changed(min(left, 0.5))

                await until(queued, paced, timeout=WITHIN_S, what="most of them wait in the queue")
                full = time.monotonic()
                await until(
                    lambda: (t := view.heard(agent)) is not None and t > full,
                    paced,
                    timeout=WITHIN_S,
                    what="the agent's state is still written",
                )
                statuses = await asyncio.gather(*flood)
            finally:
                for t in flood:
                    t.cancel()
            assert set(statuses) <= {200, 503}, statuses
            small = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
            async with s.post(f"{fleet.url}/api/generate", json=small) as r:
                assert r.status == 200, await r.text()
    finally:
        await nc.close()
