"""A NATS outage that lasts: requests waiting for a slot when the gateway loses NATS, or arriving
while it is away, end with a 503 that says the fleet is unreachable once it has been away for
`CORRAL_NATS_OUTAGE_S`, not with the queue-is-full text at the end of their deadline.

And a short one, a restart under a streamed answer: what its agent sent while NATS was away is lost
(core NATS keeps nothing for a subscriber that is not there), so the client's stream ends with an
error line where the hole begins, its agent stops generating, and the client never sees text go on
with words missing from its middle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import nats
import pytest
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import NatsServer
from corral.runtime.workqueue import depths
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload
from tests.integration.fleet_helpers import until as fleet_until
from tests.integration.waits import until

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
OUTAGE_S = 1.0
BOUND_S = 30.0  # a bound on the test, far above the outage limit; the deadline is ten minutes


@pytest.fixture
async def fleet(server: NatsServer, root: str) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=server.url,
        root=root,
        # one slot each, replies of minutes: two requests hold the fleet, the next ones wait
        sims=default_sims(2, time_scale=1.0, num_parallel=1, reply_tokens=[100_000, 100_000]),
        agent={"refresh_s": 0.5, "heartbeat_s": 0.5},
        gateway={"nats_outage_s": OUTAGE_S, "queue_timeout_s": 600.0},
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


async def _answer(http: aiohttp.ClientSession, url: str, prompt: str) -> tuple[int, dict[str, str]]:
    body = {"model": MODEL, "prompt": prompt, "stream": False}
    async with http.post(f"{url}/api/generate", json=body) as r:
        return r.status, await r.json()


async def test_requests_end_with_fleet_unreachable_once_nats_has_been_away_long_enough(
    server: NatsServer, fleet: LocalFleet, root: str
) -> None:
    nc = await nats.connect(server.url)
    async with aiohttp.ClientSession() as http:
        streams = []
        for i in range(2):  # the fleet's two slots, taken for minutes
            streams.append(
                await http.post(f"{fleet.url}/api/generate", json={"model": MODEL, "prompt": f"long {i}"})
            )
            assert streams[-1].status == 200
        waiting = asyncio.ensure_future(_answer(http, fleet.url, "waits for a slot"))

        async def queued() -> bool:
            return sum((await depths(nc, Subjects(root))).values()) == 1

        assert fleet.gateway is not None
        view = fleet.gateway.fleet  # the agents write their queued counts: woken by that, or each 0.5 s
        await until(
            queued, lambda left: view.wait_changed(min(left, 0.5)), timeout=10, what="one request queued"
        )
        await nc.close()
        await server.kill()
        async with asyncio.timeout(BOUND_S):
            status, body = await waiting
            assert status == 503 and body["error"].startswith("fleet unreachable: "), body
            arriving = await _answer(http, fleet.url, "arrives while NATS is away")
            assert arriving[0] == 503 and arriving[1]["error"].startswith("fleet unreachable: "), arriving
            # the status page and a scrape answer from what the gateway knows, and say it is cut off
            async with http.get(f"{fleet.url}/metrics") as r:
                assert r.status == 200 and "\ncorral_gateway_nats_connected 0.0\n" in await r.text()
            async with http.get(f"{fleet.url}/api/status") as r:
                shown = await r.json()
                assert r.status == 200 and shown["queue"] == {}
                assert shown["nats_away_s"] >= OUTAGE_S, shown  # its agents are only as last seen
            # ... and stay as last seen: silence while NATS is away is not the agents', however
            # long it lasts (the watch alone would notice only after 15 s of it, all agents stale)
            assert view.deaf and len(shown["agents"]) == 2, shown["agents"]
            known = [s for a in fleet.agents if (s := view.get(a.id)) is not None]
            assert len(known) == 2 and all(view.alive(s, time.monotonic() + 3600) for s in known)
            # a fleet-wide change says at once that nothing can reach the fleet
            for method, path, body in (
                ("POST", "/api/pull", {"model": "mistral"}),
                ("DELETE", "/api/delete", {"model": MODEL}),
            ):
                async with http.request(method, f"{fleet.url}{path}", json=body) as r:
                    said = await r.json()
                    assert r.status == 503 and said["error"].startswith("fleet unreachable: "), (path, said)
        for r in streams:
            r.close()
        await server.start()  # the fleet stops cleanly
        gw = fleet.gateway
        await fleet_until(
            fleet, lambda: gw.nc is not None and gw.nc.is_connected, what="the gateway back on NATS"
        )
        async with http.get(f"{fleet.url}/api/status") as r:
            assert (await r.json())["nats_away_s"] is None
        await fleet_until(fleet, lambda: not view.deaf and len(view.agents()) == 2, what="heard again")


async def test_a_stream_ends_in_words_where_a_nats_restart_cut_it(
    server: NatsServer, fleet: LocalFleet
) -> None:
    sims = fleet.sims
    finished = [sim.stats.finished for sim in sims]  # the preload's
    lines: list[dict[str, object]] = []
    async with aiohttp.ClientSession() as http, asyncio.timeout(BOUND_S):
        body = {"model": MODEL, "prompt": "a long story"}
        async with http.post(f"{fleet.url}/api/generate", json=body) as r:
            assert r.status == 200
            restarted = False
            async for raw in r.content:
                if not raw.strip():
                    continue
                lines.append(msgspec.json.decode(raw))
                if len(lines) == 5 and not restarted:  # the stream runs: restart NATS under it
                    await server.kill()
                    await server.start()
                    restarted = True
        # the agent was told to stop: its Ollama's request ends as a client's that went away
        cancelled = [
            asyncio.ensure_future(s.stats.wait_for(lambda st: st.cancelled >= 1, BOUND_S)) for s in sims
        ]
        done, pending = await asyncio.wait(cancelled, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        assert all(t.exception() is None for t in done)
    last = lines[-1]
    assert "error" in last, last
    assert str(last["error"]).startswith("the NATS connection was lost while agent "), last
    assert not any(line.get("done") for line in lines), "a stream cut short never says done"
    assert [sim.stats.finished for sim in sims] == finished
