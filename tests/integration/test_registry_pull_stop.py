"""A registry that stops while pulls are under way ends each pull's reply at once, saying it stops,
so that a pull sent through the gateway carries on through another registry copy."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import msgspec
import pytest
from corral.protocol import headers as H
from corral.protocol.envelope import RequestEnvelope
from corral.protocol.names import parse_name
from corral.registry.registry import Registry
from corral.registry.settings import RegistrySettings
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
            assert h.get(H.ERROR_CODE) == "agent_unavailable", h  # what a sender that knows no more retries
            assert h.get(H.STOPPING) == "1", h  # the same pull may go to another copy


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


async def test_a_pull_whose_registry_stops_carries_on_through_another_copy(
    nats_server: NatsServer, root: str
) -> None:
    """A rolling restart of the registries under `ollama pull`: the copy running the pull leaves its
    queue group and ends the pull saying it stops; the gateway sends it again, the other copy takes
    it, and the client's one progress stream goes on to ``success`` with no error line."""
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=1.0, pull_bandwidth=400e6),  # 1.3 GB: about 3 s
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        aggregator=None,
    )
    async with LocalFleet(options) as fleet:
        assert fleet.registry is not None
        second = Registry(RegistrySettings(nats_url=nats_server.url, root=root, probe_s=0))
        await second.start()
        sim = fleet.sims[0]
        lines = []
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.post(fleet.url + "/api/pull", json={"model": "llama3.2:1b"}) as r,
            ):
                assert r.status == 200
                while not lines or not lines[-1].get("completed"):  # under way on the agent
                    lines.append(json.loads(await r.content.readline()))
                cut_at = len(lines)
                serving = [reg for reg in (fleet.registry, second) if reg._pulls and reg._pulls._by_request]
                assert len(serving) == 1
                await serving[0].stop()
                lines += [json.loads(raw) async for raw in r.content]
        finally:
            await second.stop()
    assert [line for line in lines if "error" in line] == []
    assert lines[-1] == {"status": "success"}
    assert sim.stats.pulls == 2 and sim.stats.pulls_cut == 1  # the stopped copy's pull, then the other's
    # the second pull resumed the layer where the first had got to, as Ollama resumes a partial blob
    again = [i for i, line in enumerate(lines) if line == {"status": "pulling manifest"}]
    assert len(again) == 2 and again[1] >= cut_at  # the other copy's lines follow the first's
    digest = lines[cut_at - 1]["digest"]
    resumed = next(line for line in lines[again[1] :] if line.get("digest") == digest)
    assert resumed.get("completed", 0) >= lines[cut_at - 1]["completed"] > 0
    assert parse_name("llama3.2:1b").key in sim.ctx.catalog.models
