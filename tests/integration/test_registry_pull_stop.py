"""A registry that stops while pulls are under way ends each pull's reply at once."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import pytest
from corral.protocol import headers as H
from corral.protocol.envelope import RequestEnvelope
from corral.protocol.names import parse_name
from corral.runtime.nats import round_trip
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims
from nats.aio.msg import Msg

pytestmark = pytest.mark.integration


async def test_a_pull_taken_just_before_the_registry_stops_is_answered(
    nats_server: NatsServer, root: str
) -> None:
    """The pull is taken (its task made) and the registry stops before that task first runs: asyncio
    would never run a task cancelled then, and the asker would wait for an answer until its idle
    timeout. Its reply ends with a retryable error instead, as does one already running."""
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=1.0),  # a 1.3 GB pull at 200 MB/s: seconds
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        aggregator=None,
    )
    async with LocalFleet(options) as fleet:
        registry, gw = fleet.registry, fleet.gateway
        assert registry is not None and registry._pulls is not None and gw is not None and gw.nc is not None
        nc = gw.nc
        ends = []
        for name in ("running", "just-taken"):
            reply = f"{root}.reply.test.{name}"
            sub = await nc.subscribe(reply)
            assert await round_trip(nc, 10.0)  # the server has the subscription before any answer
            headers = RequestEnvelope(rid=name, endpoint="/api/pull").headers()
            body = msgspec.json.encode({"model": "llama3.2:1b"})  # in the simulator's registry, not on disk
            await registry._pulls.on_pull(Msg(nc, subject="pull", reply=reply, data=body, headers=headers))
            ends.append(sub)
            if name == "running":
                first = await sub.next_msg(timeout=10)  # it runs: the registry claimed it
                assert (first.headers or {}).get(H.KIND) == H.CLAIM
        await registry._pulls.stop()  # no step of the loop between taking the second pull and this
        for sub in ends:
            async with asyncio.timeout(5):
                while True:
                    h = (await sub.next_msg(timeout=5)).headers or {}
                    if h.get(H.KIND) == H.END_KIND or h.get(H.END) == "1":
                        break
            assert h.get(H.ERROR_CODE) == "agent_unavailable", h


async def test_a_pull_whose_client_went_away_stops_on_every_agent(nats_server: NatsServer, root: str) -> None:
    """`ollama pull` given Ctrl-C: the gateway cancels its call, and the registry running the
    fleet-wide pull stops it on each agent, as Ollama stops a pull whose client left, instead of
    downloading the model everywhere for nobody."""
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(2, time_scale=1.0, pull_bandwidth=100e6),  # 1.3 GB: about 13 s each
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        aggregator=None,
    )
    async with LocalFleet(options) as fleet, aiohttp.ClientSession() as s:
        body = {"model": "llama3.2:1b"}  # in the simulator's registry, on no disk
        async with s.post(fleet.url + "/api/pull", json=body, headers={"X-Corral-Replicas": "2"}) as r:
            assert r.status == 200
            await r.content.readline()
            for sim in fleet.sims:  # under way on both agents
                await sim.stats.wait_for(lambda st: st.pulls == 1, timeout=10)
            assert all(sim.stats.pulls_ended == 0 for sim in fleet.sims)
        # the client is gone: each agent's pull ends long before its download could have
        for sim in fleet.sims:
            await sim.stats.wait_for(lambda st: st.pulls_ended == 1, timeout=10)
            assert sim.stats.pulls_cut == 1
            assert parse_name("llama3.2:1b").key not in sim.ctx.catalog.models
