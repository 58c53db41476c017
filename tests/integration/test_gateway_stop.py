"""A gateway asked to stop (SIGTERM, Ctrl-C) ends every request it holds in words: one running may
finish within the HTTP grace, one waiting in the fleet queue may be served within it, and near its
end one still running is cancelled at its agent and ends with an error line, one still queued is
answered 503."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import pytest
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims
from prometheus_client import CollectorRegistry

from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.integration

MODEL = "llama3.2"
GRACE_S = 6  # the HTTP server's: requests are ended in words 2 s before it runs out


def statuses(registry: CollectorRegistry) -> dict[str, int]:
    """Model requests this gateway counted, by the status it recorded."""
    out: dict[str, int] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if (
                sample.name == "corral_gateway_requests_total"
                and sample.labels["endpoint"] == "/api/generate"
            ):
                out[sample.labels["status"]] = out.get(sample.labels["status"], 0) + int(sample.value)
    return out


def one_slot(nats_server: NatsServer, root: str) -> FleetOptions:
    """One simulated server with one slot, whose replies go on for as long as a test needs."""
    return FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=1.0, num_parallel=1, reply_tokens=[100_000, 100_000]),
        agent={"refresh_s": 0.5, "heartbeat_s": 0.5, "parallel": 1},
        http_grace_s=GRACE_S,
        aggregator=None,
    )


async def test_a_stopping_gateway_ends_what_its_grace_did_not_see_through_in_words(
    nats_server: NatsServer, root: str
) -> None:
    fleet = LocalFleet(one_slot(nats_server, root))
    await fleet.start()
    stopping: asyncio.Task[None] | None = None
    try:
        await preload(fleet, MODEL)
        sim = fleet.sims[0]
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "a long story"}
            async with s.post(fleet.url + "/api/generate", json=body) as running:
                assert running.status == 200
                await running.content.readline()  # its one slot is busy now
                assert fleet.gateway is not None and fleet.gateway.nc is not None
                nudges = await fleet.gateway.nc.subscribe(f"{root}.queued.>")  # after each enqueue
                queued = asyncio.create_task(s.post(fleet.url + "/api/generate", json=body))
                await nudges.next_msg(timeout=10)  # it waits in the fleet queue
                await nudges.unsubscribe()
                stopping = asyncio.create_task(fleet.stop())
                # the stop began: the queued request waits on, answered only as the grace runs out
                # (the slot never freed), while the running stream goes on
                async with asyncio.timeout(GRACE_S + 3), await queued as r:
                    assert r.status == 503 and await r.json() == {"error": "server shutting down"}
                    assert fleet.gateway.planner.shutdown.closing.done()
                async with asyncio.timeout(GRACE_S + 3):
                    lines = [msgspec.json.decode(line) async for line in running.content]
        # ended in words (a cut by the server would leave no such line), after running meanwhile
        assert lines[-1] == {"error": "server shutting down"} and len(lines) > 10
        async with asyncio.timeout(5):
            await sim.stats.wait_for(lambda st: st.cancelled >= 1, timeout=5)  # stopped at its Ollama
        # counted as their clients were told: the queued one 503, the stream its last line's 503
        # (not 200: it did not end as an answer), neither as gone (499)
        assert fleet.gateway is not None
        assert statuses(fleet.gateway.planner.metrics.registry) == {"503": 2}
    finally:
        if stopping is None:
            await fleet.stop()
        else:
            async with asyncio.timeout(30):
                await stopping


async def test_a_request_queued_while_the_gateway_stops_is_served_when_a_slot_frees(
    nats_server: NatsServer, root: str
) -> None:
    """Within the grace a queued request is served as any other: its client (curl, the ollama
    package) would not have retried another gateway on a 503."""
    async with LocalFleet(one_slot(nats_server, root)) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)
        assert fleet.gateway is not None
        body = {"model": MODEL, "prompt": "a long story"}
        short = {"model": MODEL, "prompt": "x", "stream": False, "options": {"num_predict": 2}}
        async with s.post(fleet.url + "/api/generate", json=body) as running:
            await running.content.readline()  # its one slot is busy now
            fleet.gateway.begin_stop(3600.0)  # the stop began; the server still takes connections
            queued = asyncio.create_task(s.post(fleet.url + "/api/generate", json=short))
            assert msgspec.json.decode(await running.content.readline())["done"] is False  # still running
        # the running stream's client left: its slot frees, and the queued request takes it
        async with asyncio.timeout(10), await queued as r:
            assert r.status == 200 and (await r.json())["done"] is True
