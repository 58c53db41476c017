"""FleetView across a watch opened again on a bucket that came back empty (a NATS cluster electing a
new leader, a restarted server refilling memory buckets): live agents are not dropped on it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import corral.runtime.fleet as fleet_module
import pytest
from corral.protocol.messages import AgentState, TagModel, agent_state_encoder
from corral.protocol.names import key_of
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import Buckets, ensure_buckets
from corral.runtime.fleet import FleetView
from corral.runtime.nats import connect
from corral.runtime.natsserver import NatsServer
from nats.js.api import KeyValueConfig

from tests.integration import waits

pytestmark = pytest.mark.integration

MODEL = TagModel(name="llama3.2:latest", model="llama3.2:latest", modified_at="", size=1, digest="d")


async def test_a_watch_opened_again_on_an_empty_bucket_keeps_the_agents_it_heard_recently(
    nats_server: NatsServer, root: str
) -> None:
    subjects = Subjects(root)
    nc = await connect(nats_server.url, name="test")
    try:
        js = nc.jetstream()
        buckets = await ensure_buckets(js, subjects)
        state = AgentState(id="a1", vendor="cpu", host="h", ollama_url="http://h", models=(MODEL,))
        await buckets.agents.put("a1", agent_state_encoder.encode(state))
        fleet = FleetView(buckets.agents)
        await fleet.start()
        key = key_of("llama3.2")
        assert key is not None and [a.id for a in fleet.with_model(key)] == ["a1"]
        try:
            # the bucket is replaced by an empty one, as a memory bucket after a NATS restart
            await js.delete_key_value(subjects.agents_bucket)
            await js.create_key_value(KeyValueConfig(bucket=subjects.agents_bucket, history=1))
            await _reopen(fleet)
            assert [a.id for a in fleet.with_model(key)] == ["a1"]  # heard moments ago: kept
            # silent past its liveness window: gone, though silent only lately (a registry may
            # have removed it while the watch was closed, and this is what ends its calls)
            fleet._heard["a1"] -= (fleet_module.STALE_HEARTBEATS + 1) * state.heartbeat_s
            await _reopen(fleet)
            assert fleet.get("a1") is None and fleet.lately_silent_with(key) == []
            await buckets.agents.put("a1", agent_state_encoder.encode(state))  # back
            while fleet.get("a1") is None:
                assert await fleet.wait_changed(5.0)
            # a deletion the watch does see removes it at once
            await buckets.agents.delete("a1")
            while fleet.get("a1") is not None:
                assert await fleet.wait_changed(5.0)
        finally:
            await fleet.stop()
    finally:
        await nc.close()


async def test_a_state_under_another_agents_key_is_not_believed(nats_server: NatsServer, root: str) -> None:
    """The KV key says whose state it is: a value naming another agent is ignored, so nobody can
    overwrite a live agent's state (or make up one) by writing under a key of their own."""
    async with holding_a1(nats_server, root) as (buckets, fleet):
        forged = AgentState(id="a1", vendor="amd", host="evil", ollama_url="http://evil")
        await buckets.agents.put("mallory", agent_state_encoder.encode(forged))
        await buckets.agents.put(
            "a2",
            agent_state_encoder.encode(AgentState(id="a2", vendor="cpu", host="h", ollama_url="http://h2")),
        )
        while fleet.get("a2") is None:  # the watch has read past the forged entry
            assert await fleet.wait_changed(5.0)
        assert fleet.get("mallory") is None
        a = fleet.get("a1")
        assert a is not None and (a.host, a.vendor) == ("h", "cpu")


async def test_an_agent_whose_key_is_deleted_is_announced_gone_once(
    nats_server: NatsServer, root: str
) -> None:
    subjects = Subjects(root)
    nc = await connect(nats_server.url, name="test")
    try:
        buckets = await ensure_buckets(nc.jetstream(), subjects)
        a1 = AgentState(id="a1", vendor="cpu", host="h", ollama_url="http://h")
        await buckets.agents.put("a1", agent_state_encoder.encode(a1))
        fleet = FleetView(buckets.agents)
        gone: list[str] = []
        fleet.on_gone(gone.append)
        await fleet.start()
        try:
            await buckets.agents.delete("never-there")
            await buckets.agents.delete("a1")
            while fleet.get("a1") is not None:
                assert await fleet.wait_changed(5.0)
            assert gone == ["a1"]
        finally:
            await fleet.stop()
    finally:
        await nc.close()


async def test_has_model_answers_as_the_holders_do_live_stale_and_gone(
    nats_server: NatsServer, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`has_model` (the per-request check whether the fleet knows a model) agrees with `with_model`:
    a live holder counts, one silent past its heartbeats or deleted does not. `lately_silent_with`
    lists a holder silent past its heartbeats by up to as many again."""
    key, other = key_of("llama3.2"), key_of("qwen2.5")
    assert key is not None and other is not None
    async with holding_a1(nats_server, root) as (buckets, fleet):
        assert fleet.has_model(key) and not fleet.has_model(other)
        a1 = fleet.get("a1")
        assert a1 is not None
        later = fleet_module.time.monotonic() + 4 * a1.heartbeat_s
        with monkeypatch.context() as m:
            m.setattr(fleet_module.time, "monotonic", lambda: later)  # no await in here
            assert not fleet.has_model(key) and fleet.with_model(key) == []  # silent: dead
            assert [a.id for a in fleet.lately_silent_with(key)] == ["a1"]  # but only lately
        gone = fleet_module.time.monotonic() + (fleet_module.LATELY_SILENT_HEARTBEATS + 1) * a1.heartbeat_s
        with monkeypatch.context() as m:
            m.setattr(fleet_module.time, "monotonic", lambda: gone)
            assert fleet.lately_silent_with(key) == [] and not fleet.has_model(key)
        assert fleet.has_model(key) and fleet.lately_silent_with(key) == []  # live: not silent
        await buckets.agents.delete("a1")
        while fleet.get("a1") is not None:
            assert await fleet.wait_changed(5.0)
        assert not fleet.has_model(key)


async def test_agents_do_not_turn_dead_for_a_silence_the_view_could_not_hear(
    nats_server: NatsServer, root: str
) -> None:
    """The watch fails (here its bucket is gone; as well JetStream without a quorum, when agents
    cannot write their state either, though their claims still serve): the agents it knew stay
    alive and their models found however long that lasts, not "not found" after six heartbeats.
    Once it hears again, silence counts as before, leaving out the time it could not hear."""
    async with holding_a1(nats_server, root) as (buckets, fleet):
        key = key_of("llama3.2")
        a1 = fleet.get("a1")
        assert a1 is not None and key is not None
        later = time.monotonic() + 10 * fleet_module.LATELY_SILENT_HEARTBEATS * a1.heartbeat_s
        assert not fleet.alive(a1, later)  # by the clock alone it would be gone by then
        nc = await connect(nats_server.url, name="test-js")
        try:
            js = nc.jetstream()
            await js.delete_key_value(Subjects(root).agents_bucket)
            fleet.restart()  # the watch opened again fails
            await waits.until(lambda: fleet.deaf, fleet.wait_changed, timeout=10)
            assert fleet.alive(a1, later) and [a.id for a in fleet.with_model(key)] == ["a1"]

            # as if it had been deaf for long, a1 heard last just before: it is as silent as then
            fleet._deaf_since -= 100.0  # type: ignore[operator]
            fleet._heard["a1"] -= 100.0
            await ensure_buckets(js, Subjects(root))  # back, empty: a1 has not written yet
            await waits.until(lambda: not fleet.deaf, fleet.wait_changed, timeout=15)
            assert fleet.get("a1") is not None and fleet.alive(a1)  # not gone, nor dead
            assert not fleet.alive(a1, later)  # its silence counts again
        finally:
            await nc.close()


async def _reopen(fleet: FleetView) -> None:
    """Open the fleet view's watch again and wait until its snapshot has been read."""
    seen = fleet.revision
    fleet.restart()
    while fleet.revision == seen:
        assert await fleet.wait_changed(5.0)


@contextlib.asynccontextmanager
async def holding_a1(server: NatsServer, root: str) -> AsyncIterator[tuple[Buckets, FleetView]]:
    """The buckets, with agent ``a1`` holding `MODEL`, and a started fleet view of them."""
    nc = await connect(server.url, name="test")
    try:
        buckets = await ensure_buckets(nc.jetstream(), Subjects(root))
        a1 = AgentState(id="a1", vendor="cpu", host="h", ollama_url="http://h", models=(MODEL,))
        await buckets.agents.put("a1", agent_state_encoder.encode(a1))
        fleet = FleetView(buckets.agents)
        await fleet.start()
        try:
            yield buckets, fleet
        finally:
            await fleet.stop()
    finally:
        await nc.close()
