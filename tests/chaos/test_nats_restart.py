"""A NATS restart is not an outage: nats-server SIGKILLed and started again on the same port and
store, and, without restarting any Corral process, the fleet serves again.

The gateway, registry, aggregator and two agents beside simulators run in this process
(`corral.up.LocalFleet`) against a nats-server the test controls. What the server kept in memory
(the agents and views buckets) is gone after the restart: every service opens the buckets again on
reconnect and restarts its watches, and the agents announce themselves at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import msgspec
import nats
import pytest
from corral import views
from corral.protocol.names import ANY_VENDOR
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import NatsServer
from corral.transport import Transport
from corral.transport.request import model_work
from corral.up import FleetOptions, LocalFleet, default_sims
from nats.js.errors import KeyNotFoundError

from tests.integration.fleet_helpers import preload
from tests.integration.waits import Wake, until

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
BACK_WITHIN_S = 15.0  # reconnects back off to 2 s at most, agents heartbeat every 0.5 s


@pytest.fixture
async def fleet(server: NatsServer, root: str) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=server.url,
        root=root,
        sims=default_sims(2, time_scale=0.01),
        agent={"refresh_s": 0.5, "heartbeat_s": 0.5},
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


def _any_change(fleet: LocalFleet) -> Wake:
    """Woken by every change the services' fleet views hear, and at least every half second: a
    write by the aggregator changes no fleet view."""
    assert fleet.aggregator is not None
    view = fleet.aggregator.fleet
    return lambda remaining: view.wait_changed(min(remaining, 0.5))


async def test_a_nats_restart_is_not_an_outage(
    server: NatsServer, fleet: LocalFleet, caplog: pytest.LogCaptureFixture
) -> None:
    assert fleet.gateway is not None and fleet.aggregator is not None and fleet.registry is not None
    ids = sorted(a.id for a in fleet.agents)
    await server.kill()
    restarted = time.monotonic()
    await server.start()

    def heard_again(view_heard: Callable[[str], float | None]) -> bool:
        return all((t := view_heard(i)) is not None and t > restarted for i in ids)

    gw, agg, reg = fleet.gateway.fleet, fleet.aggregator.fleet, fleet.registry.fleet

    async def everyone_heard_again() -> bool:
        return heard_again(gw.heard) and heard_again(agg.heard) and heard_again(reg.heard)

    await until(
        everyone_heard_again,
        _any_change(fleet),
        timeout=BACK_WITHIN_S,
        what="every service heard every agent again",
    )

    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "hello again", "stream": False}
        async with s.post(f"{fleet.url}/api/generate", json=body) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["done"] is True
        async with s.get(f"{fleet.url}/api/tags") as r:
            tags = await r.json()
            assert r.status == 200 and any(m["name"].startswith(MODEL) for m in tags["models"])
        async with s.get(f"{fleet.url}/api/status") as r:
            status = await r.json()
            assert r.status == 200
            assert sorted(a["id"] for a in status["agents"]) == ids
        async with s.get(f"{fleet.url}/ready") as r:
            assert r.status == 200

    # the aggregator wrote its views again into the views bucket that the restart emptied
    buckets = fleet.aggregator._buckets
    assert buckets is not None

    async def views_back() -> bool:
        # status changes with the clock and is rewritten anyway; tags does not: it comes back only
        # because the aggregator forgot what it had written before the restart
        try:
            status, tags = await buckets.views.get(views.STATUS_KEY), await buckets.views.get("tags")
        except KeyNotFoundError:
            return False
        written = msgspec.json.decode(status.value or b"{}")
        return bool(tags.value) and sorted(a["id"] for a in written.get("agents", [])) == ids

    await until(
        views_back, _any_change(fleet), timeout=BACK_WITHIN_S, what="the aggregator's views written again"
    )

    # a clean stop after the outage: nobody says its connection closed "for good"
    await fleet.stop()
    for_good = [r.getMessage() for r in caplog.records if "closed for good" in r.getMessage()]
    assert for_good == []


async def test_a_request_whose_nudge_reached_no_agent_is_taken_once_the_agents_are_back(
    server: NatsServer, fleet: LocalFleet, root: str
) -> None:
    """An agent looks at the fleet queue only when nudged that a request waits there; a nudge sent
    while it was off NATS reaches nobody. Back on NATS, it looks at every queue of its warm models:
    a request queued without a nudge is served with nothing else happening."""
    subjects = Subjects(root)
    nc = await nats.connect(server.url)  # reconnects by itself
    transport = Transport(nc, subjects)
    await transport.start()
    body = msgspec.json.encode({"model": MODEL, "prompt": "waiting", "stream": False})
    req = model_work("/api/generate", body, MODEL)
    assert req.model is not None
    call, headers, payload = transport.register(req, None, time.monotonic() + 60, queued=True)
    try:
        js = nc.jetstream()
        async with aiohttp.ClientSession() as s:

            async def other_work() -> None:  # after each, the serving agent looks again at its queues
                body = {"model": MODEL, "prompt": "other work", "stream": False}
                async with s.post(f"{fleet.url}/api/generate", json=body) as r:
                    assert r.status == 200

            for _ in range(2 * len(fleet.agents)):
                await other_work()  # every agent knows its queue empty now
            # no nudge. (More work after it could be queued itself under load, with a nudge: the
            # agent that took that would take this one too, oldest first.)
            await js.publish(subjects.queue(ANY_VENDOR, req.model.token), payload, headers=headers)
        assert (await js.stream_info(subjects.queue_stream)).state.messages == 1  # left there
        before = [sim.stats.started for sim in fleet.sims]
        await server.kill()
        await server.start()
        taken = [
            asyncio.ensure_future(sim.stats.wait_for(lambda st, n=n: st.started > n, BACK_WITHIN_S))
            for sim, n in zip(fleet.sims, before, strict=True)
        ]
        done, pending = await asyncio.wait(taken, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        assert all(t.exception() is None for t in done), "the queued request was not taken"
    finally:
        transport.release(call)
        await transport.stop()
        await nc.close()
