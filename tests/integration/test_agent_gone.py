"""An agent that leaves the fleet (a registry found it dead, or it stopped) ends the gateway's calls
on it at once, not when their idle timeout runs out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
from corral.agent.agent import Agent
from corral.gateway.app import Gateway
from corral.protocol.messages import AgentState, agent_state_decoder
from corral.runtime.fleet import LATELY_SILENT_HEARTBEATS, STALE_HEARTBEATS
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.integration

MODEL = "llama3.2"
IDLE_TIMEOUT_S = 30.0  # far longer than the test allows: an ending within seconds is not the timeout


@pytest.fixture
async def fleet(nats_server: NatsServer, root: str) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=0.05),
        agent={"refresh_s": 0.5, "heartbeat_s": 5.0},
        gateway={"idle_timeout_s": IDLE_TIMEOUT_S},
        registry=None,
        aggregator=None,
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


async def test_a_stream_on_an_agent_that_left_ends_with_an_error_line_at_once(fleet: LocalFleet) -> None:
    assert fleet.gateway is not None and fleet.gateway.nc is not None
    agent = fleet.agents[0]
    kv = await fleet.gateway.nc.jetstream().key_value(fleet.gateway.subjects.agents_bucket)
    body = {"model": MODEL, "prompt": "a long story", "options": {"num_predict": 100_000}}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fleet.url}/api/generate", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # tokens are flowing
            await kv.delete(agent.id)  # what a registry does to an agent it found dead
            left = time.monotonic()
            async with asyncio.timeout(10):
                lines = [line async for line in r.content]
    assert time.monotonic() - left < 3  # the key's deletion, heard through the watch: not a timeout
    last = msgspec.json.decode(lines[-1])
    assert "left the fleet" in last["error"]


async def test_a_draining_agent_heartbeats_until_its_last_stream_has_finished(
    nats_server: NatsServer, root: str
) -> None:
    """A stop (SIGTERM) drains: the agent takes nothing new but its running streams may finish within
    its drain grace, however many heartbeats that takes, with a registry watching for silent agents."""
    heartbeat_s = 0.2
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=1.0, reply_tokens=[500, 500]),  # ~3 s: many heartbeats
        agent={"refresh_s": 0.5, "heartbeat_s": heartbeat_s, "drain_grace_s": 30.0},
        gateway={"idle_timeout_s": IDLE_TIMEOUT_S},
        aggregator=None,
    )
    async with LocalFleet(options) as fleet:
        await preload(fleet, MODEL)
        assert fleet.gateway is not None
        view = fleet.gateway.fleet
        agent = fleet.agents[0]
        body = {"model": MODEL, "prompt": "a story", "options": {"num_predict": 1000}}
        async with aiohttp.ClientSession() as s, s.post(f"{fleet.url}/api/generate", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # tokens are flowing
            stopping = asyncio.create_task(agent.stop())
            started = time.monotonic()
            async with asyncio.timeout(20):
                lines = [msgspec.json.decode(line) async for line in r.content]
            took = time.monotonic() - started
        assert lines[-1]["done"] is True and not any("error" in x for x in lines), lines[-1]
        assert took > STALE_HEARTBEATS * heartbeat_s * 2  # long past the silence a registry removes
        async with asyncio.timeout(10):
            await stopping
        assert agent.id not in {a.id for a in view.agents()}  # gone once drained


async def test_a_stream_past_its_agents_drain_grace_ends_saying_so(
    nats_server: NatsServer, root: str
) -> None:
    """A stop lets running streams finish within the drain grace; one that does not is ended then,
    and its client reads why, not a bare cancellation."""
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=1.0, reply_tokens=[100_000, 100_000]),  # minutes
        agent={"refresh_s": 0.5, "heartbeat_s": 0.5, "drain_grace_s": 0.5},
        gateway={"idle_timeout_s": IDLE_TIMEOUT_S},
        registry=None,
        aggregator=None,
    )
    async with LocalFleet(options) as fleet:
        await preload(fleet, MODEL)
        agent = fleet.agents[0]
        body = {"model": MODEL, "prompt": "a story"}
        async with aiohttp.ClientSession() as s, s.post(f"{fleet.url}/api/generate", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # tokens are flowing
            stopping = asyncio.create_task(agent.stop())
            async with asyncio.timeout(20):
                lines = [msgspec.json.decode(line) async for line in r.content]
                await stopping
    assert lines[-1]["error"] == f"agent {agent.id} stopped: its drain grace of 0.5s ran out", lines[-1]


async def test_a_model_held_only_by_a_lately_silent_agent_waits_for_it_not_answered_not_found(
    nats_server: NatsServer, root: str
) -> None:
    """An agent whose heartbeats are late (a loaded host, a NATS leader election) may only be slow.
    A request for a model only it holds waits for it to speak again and is served, instead of
    `404 model not found` (on which the ollama CLI would pull the model again), and `/api/show`
    goes to it. Silent for longer (`LATELY_SILENT_HEARTBEATS`), it is gone: 404 at once."""
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=0.0),
        agent={"refresh_s": 0.5, "heartbeat_s": 2.0},
        registry=None,  # nothing removes a silent agent's state: only its silence counts
        aggregator=None,
    )
    async with LocalFleet(options) as fleet, aiohttp.ClientSession() as s:
        gw, agent = fleet.gateway, fleet.agents[0]
        assert gw is not None
        publish, speak, silent = agent._publish_state, asyncio.Event(), asyncio.Event()

        async def held(*args: object) -> None:
            silent.set()  # the state loop's publishes before this one are done
            await speak.wait()
            await publish(*args)  # type: ignore[arg-type]

        agent._publish_state = held  # type: ignore[method-assign]
        try:
            async with asyncio.timeout(10):
                await silent.wait()
                await _heard_last_state(gw, agent)
            await _lately_silent(fleet, gw, agent, s, speak)
        finally:
            speak.set()


async def _heard_last_state(gw: Gateway, agent: Agent) -> None:
    """The gateway has heard the last state the agent published."""
    assert gw.nc is not None
    kv = await gw.nc.jetstream().key_value(gw.subjects.agents_bucket)
    last = agent_state_decoder.decode((await kv.get(agent.id)).value or b"").updated_at
    while (a := gw.fleet.get(agent.id)) is None or a.updated_at != last:
        await gw.fleet.wait_changed(1.0)


async def _lately_silent(
    fleet: LocalFleet, gw: Gateway, agent: Agent, s: aiohttp.ClientSession, speak: asyncio.Event
) -> None:
    heartbeat_s, heard = agent.settings.heartbeat_s, gw.fleet._heard
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    # not loaded anywhere: no claim takes it, so the plan looks at the holders
    heard[agent.id] = time.monotonic() - (LATELY_SILENT_HEARTBEATS + 1) * heartbeat_s
    async with s.post(f"{fleet.url}/api/generate", json=body) as r:
        assert r.status == 404, await r.text()
    async with s.post(f"{fleet.url}/api/show", json={"model": MODEL}) as r:
        assert r.status == 404, await r.text()
    # silent past its liveness window, with most of the lately-silent window still to go
    heard[agent.id] = time.monotonic() - (STALE_HEARTBEATS + 0.5) * heartbeat_s
    async with s.post(f"{fleet.url}/api/show", json={"model": MODEL}) as r:  # what `ollama run` asks
        assert r.status == 200, await r.text()  # the agent heard last answers: it was only slow
    looked = asyncio.Event()
    lately_silent_with = gw.fleet.lately_silent_with

    def seen(key: str) -> list[AgentState]:
        found = lately_silent_with(key)
        if found:
            looked.set()
        return found

    gw.fleet.lately_silent_with = seen  # type: ignore[method-assign]
    request = asyncio.ensure_future(s.post(f"{fleet.url}/api/generate", json=body))
    async with asyncio.timeout(10):
        await looked.wait()  # it found only a lately silent holder ...
    assert not request.done()  # ... and waits
    speak.set()  # the agent's next state arrives
    async with asyncio.timeout(10):
        r = await request
    assert r.status == 200, await r.text()
    assert (await r.json())["done"]
