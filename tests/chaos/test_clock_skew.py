"""Liveness never trusts an agent's clock: an agent whose wall clock is 90 s behind (or ahead) is
listed and routable while it heartbeats, and removed and announced dead once it stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
from corral.protocol.messages import AgentEvent, AgentState, TagModel, agent_state_encoder
from corral.protocol.names import key_of
from corral.protocol.subjects import Subjects
from corral.registry.registry import Registry
from corral.registry.settings import RegistrySettings
from corral.runtime.buckets import ensure_buckets
from corral.runtime.fleet import FleetView
from corral.runtime.nats import connect
from corral.runtime.natsserver import NatsServer
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

pytestmark = pytest.mark.chaos

HEARTBEAT_S = 0.2
MODEL = "llama3.2:latest"


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await connect(nats_server.url, name="test")
    yield conn
    await conn.drain()


def state(agent_id: str, skew_s: float) -> bytes:
    now = time.time() + skew_s  # the agent's own, wrong, clock
    s = AgentState(
        id=agent_id, vendor="cpu", host="h", ollama_url="http://x", models=(TagModel(name=MODEL, model=MODEL, modified_at="", size=1, digest="d"),),
        started_at=now - 10, updated_at=now, heartbeat_s=HEARTBEAT_S,
    )  # fmt: skip
    return agent_state_encoder.encode(s)


@pytest.mark.parametrize("skew_s", [-90.0, 90.0])
async def test_a_skewed_agent_lives_while_it_heartbeats_and_dies_when_it_stops(
    nats_server: NatsServer, nc: NATS, root: str, skew_s: float
) -> None:
    subjects = Subjects(root)
    buckets = await ensure_buckets(nc.jetstream(), subjects)
    registry = Registry(RegistrySettings(nats_url=nats_server.url, root=root, replica_check_s=0))
    await registry.start()
    fleet = FleetView(buckets.agents)
    await fleet.start()
    events: asyncio.Queue[AgentEvent] = asyncio.Queue()

    async def on_event(msg: Msg) -> None:
        events.put_nowait(msgspec.json.decode(msg.data, type=AgentEvent))

    sub = await nc.subscribe(subjects.event("agent"), cb=on_event)
    key = key_of(MODEL)
    assert key is not None
    try:
        # heartbeats for longer than the agent's death time (3 heartbeats)
        loop = asyncio.get_running_loop()
        until = loop.time() + 6 * HEARTBEAT_S
        while loop.time() < until:
            seen = fleet.revision
            await buckets.agents.put("skewed", state("skewed", skew_s))
            while fleet.revision == seen:  # our own put arriving (maybe before put returns): paced by it
                assert await fleet.wait_changed(HEARTBEAT_S)
            assert [a.id for a in fleet.agents()] == ["skewed"]
            assert [a.id for a in fleet.with_model(key)] == ["skewed"]  # routable
        assert [a.id for a in registry.fleet.agents()] == ["skewed"]
        # it stops: announced dead, removed, no longer listed
        async with asyncio.timeout(10):
            while (event := await events.get()).kind != "dead":
                pass
        assert event.agent == "skewed"
        assert fleet.agents() == []
    finally:
        await sub.unsubscribe()
        await fleet.stop()
        await registry.stop()
