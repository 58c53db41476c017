"""An agent whose process is gone (killed outright: no clean stop, its state left in the bucket) is
found by the registry's probes within seconds, not when its heartbeats run out: requests queued for
its model are routed again and served elsewhere, and live agents are left alone."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from corral.agent.agent import Agent
from corral.protocol import headers as H
from corral.protocol.names import parse_name
from corral.registry.liveness import Presence
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import Events, until

pytestmark = pytest.mark.integration

MODEL = "llama3.2"
KEY = parse_name(MODEL).key
HEARTBEAT_S = 30.0  # three of them (90 s) are far past the test's bounds: only a probe can act
PROBE_S = 0.3


def _options(nats_server: NatsServer, root: str, registry: Mapping[str, Any]) -> FleetOptions:
    return FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(2, time_scale=0.02, num_parallel=1, reply_tokens=(10**6, 10**6)),
        agent={"refresh_s": 0.5, "heartbeat_s": HEARTBEAT_S},
        gateway={"queue_timeout_s": 60.0, "idle_timeout_s": 60.0},  # the streams end by the removal
        registry={"replica_check_s": 0.0} | dict(registry),  # no demand replicas: only a death re-plans
        aggregator=None,
    )


async def _kill(agent: Agent) -> None:
    """What SIGKILL does to an agent, as NATS and the fleet see it: its connection closes, with
    no state deleted and nothing said."""
    agent._wake.closing.set()
    assert agent.nc is not None
    await agent.nc.close()


async def _admin(fleet: LocalFleet, agent: Agent, kind: str) -> None:
    gw = fleet.gateway
    assert gw is not None and gw.nc is not None
    await gw.nc.request(gw.subjects.agent_admin(agent.id), b"", headers={H.CTL: kind}, timeout=5)


async def test_requests_queued_behind_a_killed_agent_are_served_elsewhere_within_seconds(
    nats_server: NatsServer, root: str
) -> None:
    async with LocalFleet(_options(nats_server, root, {"probe_s": PROBE_S})) as fleet:
        gw, (victim, spare) = fleet.gateway, fleet.agents
        assert gw is not None and gw.nc is not None
        events = Events()
        await gw.nc.subscribe(gw.subjects.event("agent"), cb=events.on)
        # the model warm on the victim only, its one slot held; the spare cordoned, so the
        # requests queue behind the victim rather than load a replica there
        await _admin(fleet, spare, H.CORDON)
        async with aiohttp.ClientSession() as s:
            async with s.post(fleet.sims[0].url + "/api/generate", json={"model": MODEL, "prompt": ""}) as r:
                assert r.status == 200
            victim._wake.refresh.set()
            await until(fleet, lambda: gw.fleet.is_loaded(victim.id, KEY), what="warm on the victim")
            nudges = await gw.nc.subscribe(f"{root}.queued.>")
            hold = await s.post(
                fleet.url + "/api/generate",
                json={"model": MODEL, "prompt": "hold", "options": {"num_predict": 10**6}},
            )
            assert hold.status == 200
            await hold.content.readline()  # generating on the victim

            async def one(i: int) -> int:
                body = {"model": MODEL, "prompt": f"q{i}", "stream": False, "options": {"num_predict": 2}}
                async with s.post(fleet.url + "/api/generate", json=body) as r:
                    await r.read()
                    return r.status

            queued = [asyncio.create_task(one(i)) for i in range(2)]
            for _ in queued:
                await nudges.next_msg(timeout=10)  # both wait in the fleet queue
            await _admin(fleet, spare, H.UNCORDON)
            await until(fleet, lambda: gw.fleet.get(spare.id).status == "active", what="spare uncordoned")
            assert not any(t.done() for t in queued)

            await _kill(victim)
            # seconds, not three heartbeats (90 s): the queue's requests are routed again
            async with asyncio.timeout(30):
                assert await asyncio.gather(*queued) == [200, 200]
                await events.wait("dead", victim.id)
                rest = [line async for line in hold.content]  # the stream on the victim ended too
            assert b"left the fleet" in rest[-1]
            hold.close()
        assert fleet.sims[1].stats.finished == 2  # the spare loaded the model and served both
        assert gw.fleet.get(victim.id) is None
        assert gw.fleet.get(spare.id) is not None and events.of("dead", spare.id) == 0


async def test_live_agents_are_never_taken_for_gone(nats_server: NatsServer, root: str) -> None:
    """Probed many times over, every agent of a fleet that is fine answers: nobody is removed."""
    async with LocalFleet(_options(nats_server, root, {"probe_s": 0.05})) as fleet:
        assert fleet.registry is not None and fleet.gateway is not None
        prober = fleet.registry._prober
        assert prober is not None
        ids = {a.id for a in fleet.agents}
        for _ in range(20):
            assert await prober.probe_once() == dict.fromkeys(ids, Presence.ANSWERED)
            assert prober.absences.missing() == {}
        prober.per_s = 1.0  # as a fleet too large to probe every period: one probe a second, in turn
        assert await prober.probe_once(over_s=len(ids)) == dict.fromkeys(ids, Presence.ANSWERED)
        assert {a.id for a in fleet.gateway.fleet.agents()} == {a.id for a in fleet.agents}
