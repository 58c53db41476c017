"""Demand-driven replicas decided on the queue's nudges, in units of the observed load time: the
agents publish how long their loads took, and a backlog that drains before a load could end starts
no load. (The cold burst that gets its replicas from the nudges alone is in test_fleet_routing.py.)
Simulated Ollamas; the registry's fallback resync is a minute away, so only nudges can decide."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp
import msgspec
import pytest
from corral.protocol import headers as H
from corral.protocol.messages import AgentState
from corral.protocol.names import parse_name
from corral.registry.replicas import RECHECK_MIN_S
from corral.routing import Route, warm
from corral.runtime.natsserver import NatsServer
from corral.runtime.workqueue import enqueue
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import Events, queue_and_serve, until

MODEL = "llama3.2"
KEY = parse_name(MODEL).key
TOKEN = parse_name(MODEL).token
ALIKE = {"vendor": "nvidia", "gpus": [{"name": "RTX 4090", "vram_gb": 24}], "speed": 1.0}


def _options(nats_server: NatsServer, root: str, **sim: Any) -> FleetOptions:
    return FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(2, **(ALIKE | {"num_parallel": 1} | sim)),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={"queue_timeout_s": 20.0},
        registry={"replica_check_s": 60.0},  # the fallback resync never comes in these tests
    )


async def _generate(s: aiohttp.ClientSession, fleet: LocalFleet, prompt: str) -> None:
    body = {"model": MODEL, "prompt": prompt, "stream": False, "options": {"num_predict": 8}}
    async with s.post(fleet.url + "/api/generate", json=body) as r:
        assert r.status == 200
        await r.read()


async def _warm_on_one(s: aiohttp.ClientSession, fleet: LocalFleet) -> AgentState:
    """One request loads the model on one agent; that agent's state once it shows the runner and
    how long a request took (the two may come in separate writes)."""
    gw = fleet.gateway
    assert gw is not None
    await _generate(s, fleet, "cold")
    await until(
        fleet,
        lambda: (
            any(KEY in a.request_s for a in gw.fleet.agents())
            and any(warm(Route(key=KEY), a) for a in gw.fleet.agents())
        ),
    )
    (loaded,) = [a for a in gw.fleet.agents() if warm(Route(key=KEY), a)]
    return loaded


async def test_a_burst_that_drains_faster_than_a_load_starts_no_load(
    nats_server: NatsServer, root: str
) -> None:
    """Loads take seconds here, requests a fraction of one: a backlog of three drains long before
    a replica could be ready, so the registry looks at it (on the nudges) and loads nothing."""
    opts = _options(nats_server, root, load_bandwidth=1e9, reply_tokens=(8, 8))
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        gw, registry = fleet.gateway, fleet.registry
        assert gw is not None and gw.nc is not None and registry is not None and registry.placer is not None
        await _generate(s, fleet, "cold")  # one load, measured by the agent that did it
        await until(fleet, lambda: any(KEY in a.load_s for a in gw.fleet.agents()))
        (loaded,) = [a for a in gw.fleet.agents() if KEY in a.load_s]
        spare = next(i for i, a in enumerate(fleet.agents) if a.id != loaded.id)
        assert loaded.load_s[KEY] > 1.0  # the simulated load: 2 GB at 1 GB/s and its overhead

        def idle() -> bool:  # a request sent while the last one still shows would load elsewhere
            a = gw.fleet.get(loaded.id)
            return a is not None and warm(Route(key=KEY), a) and a.in_flight == 0

        for i in range(4):  # how long a request takes, as the registry hears of finished ones
            await until(fleet, idle)
            await _generate(s, fleet, f"warm {i}")
        assert fleet.sims[spare].stats.loads == 0
        # the agent publishes how long a request held its slot, the load left out
        await until(fleet, lambda: KEY in getattr(gw.fleet.get(loaded.id), "request_s", {}))
        now = gw.fleet.get(loaded.id)
        assert now is not None and 0 < now.request_s[KEY] < loaded.load_s[KEY]

        await queue_and_serve(fleet, MODEL, 4, num_predict=8)  # queued as a gateway queues them

        plan = registry.placer.replicator.plans.get(TOKEN)
        assert plan is not None and plan.depth > 0  # the nudges made it look at the backlog
        assert plan.candidates == (fleet.agents[spare].id,)  # a replica could have gone there
        assert plan.load == () and plan.drain_s < plan.load_s  # drained before a load would end
        assert fleet.sims[spare].stats.loads == 0
        assert registry.placer.replicator.loads_started == 0


async def test_a_flood_of_nudges_reads_one_models_queue_at_most_every_recheck_min(
    nats_server: NatsServer, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every enqueue nudges; a burst of them checks the model's queue again and again, but never two
    reads of it closer together than `RECHECK_MIN_S` (each read asks JetStream for every queue's
    depth)."""
    async with LocalFleet(_options(nats_server, root)) as fleet:
        assert fleet.registry is not None and fleet.registry.placer is not None
        replicator = fleet.registry.placer.replicator
        reads: list[float] = []
        real = replicator._depths

        async def recorded() -> dict[str, int]:
            reads.append(time.monotonic())
            return await real()

        monkeypatch.setattr(replicator, "_depths", recorded)
        for _ in range(100):  # nudges arriving while the first check reads
            replicator.nudge(TOKEN)
            await asyncio.sleep(0)  # let the check start and the next nudge arrive
        await until(fleet, lambda: TOKEN not in replicator.backlogs)  # nothing queued: it lets go
    assert len(reads) >= 2  # the nudges during the first read made it read once more
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    assert min(gaps) >= RECHECK_MIN_S * 0.99, gaps


async def test_a_request_stuck_behind_endless_streams_gets_a_replica_on_an_idle_agent(
    nats_server: NatsServer, root: str
) -> None:
    """The model is warm on one agent, whose one slot an endless stream holds; another agent has
    it on disk and room. A request waits in the fleet queue: its backlog does not move in a
    request's time, so the registry loads a replica for it, however many slots the model has."""
    opts = _options(nats_server, root, load_bandwidth=1e10, reply_tokens=(100_000, 100_000))
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        gw = fleet.gateway
        assert gw is not None
        loaded = await _warm_on_one(s, fleet)
        spare = next(i for i, a in enumerate(fleet.agents) if a.id != loaded.id)
        endless = {"model": MODEL, "prompt": "endless"}
        async with s.post(fleet.url + "/api/generate", json=endless) as stream:
            assert stream.status == 200 and stream.headers["X-Corral-Agent"] == loaded.id
            await stream.content.readline()  # its one slot is taken for good
            body = {"model": MODEL, "prompt": "short", "stream": False, "options": {"num_predict": 8}}
            async with asyncio.timeout(20), s.post(fleet.url + "/api/generate", json=body) as r:
                assert r.status == 200, await r.text()
                assert r.headers["X-Corral-Agent"] == fleet.agents[spare].id
            assert fleet.sims[spare].stats.loads == 1


async def test_an_agent_a_replica_failed_on_gets_no_other_while_it_is_still_listed(
    nats_server: NatsServer, root: str
) -> None:
    """The spare agent's process is gone (its connection closed, its state still in the bucket for
    three heartbeats): the replica the backlog asks for there fails at once (nothing answers), and
    the checks that follow, every fraction of a second while the backlog lasts, send it no other
    before the registry removes it."""
    opts = _options(nats_server, root, load_bandwidth=1e10, reply_tokens=(100_000, 100_000))
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        gw, registry = fleet.gateway, fleet.registry
        assert gw is not None and gw.nc is not None and registry is not None and registry.placer is not None
        replicator = registry.placer.replicator
        events = Events()
        await gw.nc.subscribe(gw.subjects.event("agent"), cb=events.on)
        loaded = await _warm_on_one(s, fleet)
        gone = next(a for a in fleet.agents if a.id != loaded.id)
        endless = {"model": MODEL, "prompt": "endless"}
        async with s.post(fleet.url + "/api/generate", json=endless) as stream:
            assert stream.status == 200
            await stream.content.readline()  # the warm agent's one slot is taken for good
            gone._wake.closing.set()  # what SIGKILL does, as NATS sees it: the connection closes
            assert gone.nc is not None
            await gone.nc.close()
            # a request waits in the fleet queue (as a gateway queues it, with its nudge)
            body = msgspec.json.encode({"model": MODEL, "prompt": "short", "stream": False})
            headers = {H.REQUEST: "r0", H.ENDPOINT: "/api/generate", H.MODEL: TOKEN}
            reply = f"{gw.subjects.root}.reply.test.r0"
            await enqueue(
                gw.nc, gw.nc.jetstream(), gw.subjects, "any", TOKEN, body, headers | {H.REPLY: reply}
            )
            await events.wait("dead", gone.id, timeout=20)  # three heartbeats of silence
            assert replicator.loads_started == 1  # one replica there, not one per check
            plan = replicator.plans.get(TOKEN)
            assert plan is not None and plan.depth == 1 and gone.id not in plan.load
