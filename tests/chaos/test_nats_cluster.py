"""Losing one node of a three-node NATS cluster is not an outage.

The gateway, registry, aggregator and two agents beside simulators run in this process
(`corral.up.LocalFleet`), given the three nodes' URLs and three JetStream replicas. A few clients
send a bounded run of streamed generate requests; a third of the way through, the node the gateway
is connected to is SIGKILLed. Every connection moves to another node, and the buckets and the queue
stream keep a quorum (two of three) and elect new leaders where they lost one. No request hangs:
one under way at the kill finishes or ends with an error; one started after it is served. The
agents heartbeat at the default period: three missed heartbeats (15 s) outlast the elections, in
which an agent cannot publish its state (with 0.5 s heartbeats the gateway took them for dead for a
few seconds and answered 404). Once the gateway's view lists the model on every agent again, the
model is listed and served.

When two of the three die, JetStream has no quorum left and the fleet queue cannot be read, while
core NATS works on the last node: a request waiting in the queue is served by the claim of the
agent whose slot frees, not left there until its deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import pytest
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.runtime.nats import connect
from corral.runtime.natsserver import NatsServer, local_cluster, start_all
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload, until
from tests.integration.test_natsserver_cluster import wait_for_jetstream

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
REPLICAS = {"js_replicas": 3}
REQUESTS = 36  # the whole run, sent by CLIENTS clients one after another
CLIENTS = 4
KILL_AFTER = REQUESTS // 3  # requests finished before the node is killed
REQUEST_WITHIN_S = 15.0  # every request ends within this, through a failover included
RUN_WITHIN_S = 40.0  # the whole run
BACK_WITHIN_S = 15.0  # the gateway's fleet view lists the model on both agents again


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[NatsServer]]:
    servers = local_cluster(3, tmp_path)
    await start_all(servers)
    try:
        nc = await connect(",".join(s.url for s in servers), name="cluster-wait")
        try:
            await wait_for_jetstream(nc, 3)  # the fleet creates its buckets as it starts
        finally:
            await nc.close()
        yield servers
    finally:
        for s in servers:
            await s.stop()


@pytest.fixture
async def fleet(nodes: list[NatsServer], root: str) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=",".join(s.url for s in nodes),
        root=root,
        # a model stays loaded through the run, as for minutes in a real fleet: Ollama's default
        # keep-alive (5 m) is 3 s at this time scale, less than a lost claim's timeout and an election
        sims=default_sims(2, time_scale=0.01, keep_alive="1h"),
        gateway=REPLICAS,
        registry=REPLICAS,
        aggregator=REPLICAS,
        agent={"refresh_s": 0.5, **REPLICAS},  # the default heartbeat: 15 s of silence is dead
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


@dataclass
class Outcome:
    started: float
    ended: float
    status: int
    done: bool  # the last line says done
    error: str | None  # the error line or body, if any


async def _generate(s: aiohttp.ClientSession, url: str, i: int) -> Outcome:
    started = time.monotonic()
    body = {"model": MODEL, "prompt": f"request {i}", "stream": True, "options": {"num_predict": 8}}
    done, error = False, None
    async with asyncio.timeout(REQUEST_WITHIN_S), s.post(f"{url}/api/generate", json=body) as r:
        if r.status != 200:
            error = await r.text()
        else:
            async for raw in r.content:
                if not raw.strip():
                    continue
                line = msgspec.json.decode(raw)
                if "error" in line:
                    error = line["error"]
                done = done or bool(line.get("done"))
    return Outcome(started, time.monotonic(), r.status, done, error)


async def _replicas(fleet: LocalFleet) -> dict[str, int]:
    """The replicas of every bucket's stream and of the queue stream."""
    subjects = Subjects(fleet.options.root)
    buckets = (
        subjects.agents_bucket,
        subjects.models_bucket,
        subjects.sessions_bucket,
        subjects.views_bucket,
    )
    nc = await connect(fleet.options.nats_url, name="cluster-check")
    try:
        js = nc.jetstream(timeout=5.0)
        streams = (subjects.queue_stream, *(f"KV_{b}" for b in buckets))
        return {stream: (await js.stream_info(stream)).config.num_replicas for stream in streams}
    finally:
        await nc.close()


def _connected_node(fleet: LocalFleet, nodes: list[NatsServer]) -> NatsServer:
    """The node the gateway's connection is on (any node if that cannot be told)."""
    assert fleet.gateway is not None and fleet.gateway.nc is not None
    connected = fleet.gateway.nc.connected_url
    port = connected.port if connected is not None else None
    return next((n for n in nodes if n.port == port), nodes[0])


async def test_losing_one_node_of_three_hangs_no_request_and_the_fleet_serves_on(
    nodes: list[NatsServer], fleet: LocalFleet
) -> None:
    replicas = await _replicas(fleet)
    assert len(replicas) == 5 and set(replicas.values()) == {3}, replicas

    outcomes: list[Outcome] = []
    enough_done = asyncio.Event()
    sent = 0

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < REQUESTS:
            sent += 1
            outcomes.append(await _generate(s, fleet.url, sent))
            if len(outcomes) >= KILL_AFTER:
                enough_done.set()

    async def kill_one() -> tuple[NatsServer, float]:
        await enough_done.wait()
        victim = _connected_node(fleet, nodes)
        killed_at = time.monotonic()
        await victim.kill()
        return victim, killed_at

    async with aiohttp.ClientSession() as s, asyncio.timeout(RUN_WITHIN_S):
        killer = asyncio.create_task(kill_one())
        await asyncio.gather(*(client(s) for _ in range(CLIENTS)))
        _, killed_at = await killer

    assert len(outcomes) == REQUESTS
    after = [o for o in outcomes if o.started >= killed_at]
    in_flight = [o for o in outcomes if o.started < killed_at < o.ended]
    assert after, "the kill came after the last request"
    for o in after:  # not started at the kill: served in full
        served = (o.status, o.done, o.error) == (200, True, None)
        assert served, o
    for o in in_flight:  # under way at the kill: finished, or ended with an error (line or body)
        assert o.done or o.error, o
    # none hung: `_generate` bounds each request by REQUEST_WITHIN_S and raises past it

    assert fleet.gateway is not None
    key, view = parse_name(MODEL).key, fleet.gateway.fleet
    await until(fleet, lambda: len(view.with_model(key)) == len(fleet.agents), BACK_WITHIN_S)
    async with aiohttp.ClientSession() as s:
        for i in range(CLIENTS):
            o = await _generate(s, fleet.url, REQUESTS + i)
            assert (o.status, o.done, o.error) == (200, True, None), o
        body = {"model": MODEL, "prompt": "after the loss", "stream": False}
        async with s.post(f"{fleet.url}/api/generate", json=body) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["done"] is True
        async with s.get(f"{fleet.url}/api/tags") as r:
            tags = await r.json()
            assert r.status == 200 and any(m["name"].startswith(MODEL) for m in tags["models"])


async def test_a_queued_request_is_served_by_claims_when_jetstream_loses_its_quorum(
    nodes: list[NatsServer], root: str
) -> None:
    """A request waits in the fleet queue behind the one slot of the one agent; two of the three
    nodes die, so no agent can take it from the queue (JetStream has no quorum), and the slot
    frees. The gateway finds the queue's reader does not answer, takes the request back and routes
    it by claims, which need only core NATS. Without that it waited for its queue deadline, then
    got a 503."""
    queue_timeout_s = 30.0
    options = FleetOptions(
        port=0,
        nats_url=",".join(n.url for n in nodes),
        root=root,
        sims=default_sims(1, time_scale=1.0, num_parallel=1, reply_tokens=[100_000, 100_000]),
        gateway={"queue_timeout_s": queue_timeout_s, **REPLICAS},
        registry=REPLICAS,
        aggregator=None,
        agent={"parallel": 1, **REPLICAS},
    )
    long_body = {"model": MODEL, "prompt": "a long story"}  # minutes of tokens at this pace
    body = {"model": MODEL, "prompt": "waiting", "stream": False, "options": {"num_predict": 3}}
    async with LocalFleet(options) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)
        assert fleet.gateway is not None and fleet.gateway.nc is not None
        nudges = await fleet.gateway.nc.subscribe(f"{root}.queued.>")  # one per request queued
        async with s.post(f"{fleet.url}/api/generate", json=long_body) as hold:  # the one slot
            assert hold.status == 200
            await hold.content.readline()
            waiting = asyncio.create_task(s.post(f"{fleet.url}/api/generate", json=body))
            await nudges.next_msg(timeout=20)  # it waits in the fleet queue
            for n in nodes[1:]:
                await n.kill()
        # the held stream's client is gone: its slot frees (the cancel, or the agent's pings)
        async with asyncio.timeout(queue_timeout_s + 10):
            r = await waiting
            assert r.status == 200, await r.text()
            assert (await r.json())["done"] is True


async def test_a_burst_beyond_the_free_slots_waits_no_claim_timeout_on_a_cluster(
    nodes: list[NatsServer], root: str
) -> None:
    """The gateway's node forwards a request for a warm model's free slots to an agent's node by
    the interest it last heard of; one that arrives just after that slot's claim subscription took
    another is dropped there unseen (one server alone answers "no responders" at once). Such a
    request gives up its warm claim after `CORRAL_WARM_CLAIM_TIMEOUT_S`, not the claim timeout of a
    request sent to an agent itself (here long enough to show), and waits for the next free slot."""
    options = FleetOptions(
        port=0,
        nats_url=nodes[0].url,  # the gateway on one node, the agents on another
        root=root,
        sims=default_sims(2, time_scale=0.01, keep_alive="1h"),
        gateway={"claim_timeout_s": 60.0, "queue_timeout_s": 60.0, **REPLICAS},
        registry=REPLICAS,
        aggregator=None,
        agent={"nats_url": nodes[1].url, **REPLICAS},
    )
    body = {"model": MODEL, "prompt": "burst", "stream": False, "options": {"num_predict": 3}}
    async with LocalFleet(options) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)

        async def one() -> int:
            async with s.post(f"{fleet.url}/api/generate", json=body) as r:
                await r.read()
                return r.status

        for _ in range(3):  # a burst of twice the free slots, three times
            async with asyncio.timeout(30):  # a dropped request used to wait out the claim timeout
                assert await asyncio.gather(*(one() for _ in range(8))) == [200] * 8
