"""Request priorities end to end: batch work takes only spare slots, waits behind interactive work in
the fleet queue, and moves to the interactive lane once it has waited ``batch_aging_s``.

One simulated Ollama behind an agent and a gateway. A "holder" is a streamed generation long enough
to hold a slot until the test closes its connection (the gateway then cancels it at the agent), so
every ordering below follows from events, not from timing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import pytest
from corral.protocol.names import parse_name
from corral.protocol.priority import BATCH
from corral.protocol.subjects import Subjects
from corral.runtime.nats import round_trip
from corral.runtime.natsserver import NatsServer
from corral.runtime.workqueue import depths
from corral.simulator.config import load_config
from corral.up import FleetOptions, LocalFleet

from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.integration

MODEL = "llama3.2:latest"
SHORT = {"num_predict": 5}  # a quick answer; the sim's natural replies are long (holders)


def _fleet(nats_server: NatsServer, root: str, parallel: int, **gateway: Any) -> FleetOptions:
    sim = load_config(
        None,
        vendor="nvidia",
        gpus=[{"name": "card", "vram_gb": 24}],
        num_parallel=parallel,
        reply_tokens=(100_000, 100_000),
        seed=0,
    )
    return FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=[sim],
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0, "parallel": parallel},
        gateway={"queue_timeout_s": 30.0, **gateway},
        registry={"replica_check_s": 0.0},
    )


class Nudges:
    """Counts the fleet queue's enqueue nudges (one per request queued, in either lane)."""

    def __init__(self) -> None:
        self.count = 0
        self._seen = asyncio.Event()

    async def on(self, _: Any) -> None:
        self.count += 1
        self._seen.set()

    async def wait(self, n: int, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while self.count < n:
                self._seen.clear()
                await self._seen.wait()


@contextlib.asynccontextmanager
async def nudges(nats_server: NatsServer, root: str) -> AsyncIterator[Nudges]:
    seen = Nudges()
    nc = await nats.connect(nats_server.url)
    try:
        await nc.subscribe(Subjects(root).queued_all, cb=seen.on)
        assert await round_trip(nc, 10.0)
        yield seen
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def holder(s: aiohttp.ClientSession, url: str, priority: str = "interactive") -> AsyncIterator[None]:
    """A streamed generation that has started (its first chunk arrived) and holds its slot until
    the block ends (the connection closes: the gateway cancels it at the agent)."""
    body = {"model": MODEL, "prompt": "hold", "stream": True}
    r = await s.post(url + "/api/generate", json=body, headers={"X-Corral-Priority": priority})
    try:
        assert r.status == 200
        await r.content.readline()
        yield
    finally:
        r.close()


async def short(
    s: aiohttp.ClientSession, url: str, priority: str, done: list[str] | None = None, tag: str = ""
) -> tuple[int, str]:
    body = {"model": MODEL, "prompt": "short", "stream": False, "options": SHORT}
    async with s.post(url + "/api/generate", json=body, headers={"X-Corral-Priority": priority}) as r:
        await r.read()
        if done is not None:
            done.append(tag)
        return r.status, r.headers.get("X-Corral-Route", "")


async def test_batch_work_leaves_the_reserved_slot_to_interactive_requests(
    nats_server: NatsServer, root: str
) -> None:
    """Two slots, one reserved: a batch holder takes one, the next batch request waits in the
    queue's batch lane although a slot is free, and an interactive request takes that slot at once."""
    async with (
        LocalFleet(_fleet(nats_server, root, parallel=2)) as fleet,
        aiohttp.ClientSession() as s,
        nudges(nats_server, root) as queued,
    ):
        await preload(fleet, MODEL)
        sim = fleet.sims[0]
        async with holder(s, fleet.url, BATCH):
            waiting = asyncio.create_task(short(s, fleet.url, BATCH))
            await queued.wait(1)
            token = parse_name(MODEL).token
            lanes = await depths(fleet.gateway.nc, Subjects(root))  # type: ignore[union-attr]
            assert lanes == {Subjects(root).queue("any", token, BATCH): 1}
            assert sim.stats.started == 2  # the preload and the holder: the batch request waits
            status, route = await short(s, fleet.url, "interactive")
            assert (status, route) == (200, "warm")  # the spare slot, without queueing
            assert not waiting.done()
        # the holder's slot is back: the batch request runs now
        assert await asyncio.wait_for(waiting, 15) == (200, "queued")


async def test_interactive_requests_queued_later_run_before_waiting_batch_work(
    nats_server: NatsServer, root: str
) -> None:
    """One slot (nothing to reserve): two batch requests queue, then two interactive ones; when
    the slot frees, both interactive requests run first."""
    async with (
        LocalFleet(_fleet(nats_server, root, parallel=1)) as fleet,
        aiohttp.ClientSession() as s,
        nudges(nats_server, root) as queued,
    ):
        await preload(fleet, MODEL)
        done: list[str] = []
        tasks = []
        async with holder(s, fleet.url):
            for i, priority in enumerate(("batch", "batch", "interactive", "interactive")):
                tasks.append(asyncio.create_task(short(s, fleet.url, priority, done, f"{priority}{i}")))
                await queued.wait(i + 1)  # queued in this order
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert [status for status, _ in results] == [200] * 4
        assert done[:2] == ["interactive2", "interactive3"]
        assert sorted(done[2:]) == ["batch0", "batch1"]


async def test_a_batch_request_that_waited_its_aging_bound_goes_before_later_interactive_work(
    nats_server: NatsServer, root: str
) -> None:
    """Aging: after ``batch_aging_s`` in the batch lane a request joins the interactive lane's end,
    so interactive requests queued after that cannot starve it."""
    async with (
        LocalFleet(_fleet(nats_server, root, parallel=1, batch_aging_s=0.2)) as fleet,
        aiohttp.ClientSession() as s,
        nudges(nats_server, root) as queued,
    ):
        await preload(fleet, MODEL)
        subjects, token = Subjects(root), parse_name(MODEL).token
        done: list[str] = []
        async with holder(s, fleet.url):
            aged = asyncio.create_task(short(s, fleet.url, BATCH, done, "batch"))
            await queued.wait(2)  # queued in the batch lane, then moved: a second nudge
            lanes = await depths(fleet.gateway.nc, subjects)  # type: ignore[union-attr]
            assert lanes == {subjects.queue("any", token): 1}
            later = asyncio.create_task(short(s, fleet.url, "interactive", done, "interactive"))
            await queued.wait(3)
        await asyncio.wait_for(asyncio.gather(aged, later), 30)
        assert done == ["batch", "interactive"]
