"""Cluster state: membership events, death and return, fleet-wide pulls, /api/status, two of everything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import nats
import ollama
import pytest
from corral import views
from corral.agent.agent import Agent
from corral.aggregator.aggregator import Aggregator
from corral.aggregator.settings import AggregatorSettings
from corral.protocol.messages import agent_state_encoder, agent_state_of
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.registry.registry import Registry
from corral.registry.settings import RegistrySettings
from corral.runtime.buckets import ensure_buckets
from corral.runtime.fleet import IdInUse
from corral.runtime.natsserver import NatsServer
from corral.simulator import SimServer, load_config
from corral.up import Backend, FleetOptions, LocalFleet, default_sims
from corral.views import FleetStatus

from tests.integration.cli_helpers import corral_ok
from tests.integration.fleet_helpers import Events, preload, until

pytestmark = pytest.mark.integration

_status = msgspec.json.Decoder(FleetStatus)


@pytest.fixture
async def events(nats_server: NatsServer, root: str) -> AsyncIterator[Events]:
    nc = await nats.connect(nats_server.url)
    ev = Events()
    await nc.subscribe(Subjects(root).event("agent"), cb=ev.on)
    yield ev
    await nc.close()


@pytest.fixture
async def fleet(nats_server: NatsServer, root: str, events: Events) -> AsyncIterator[LocalFleet]:
    """Three simulated servers of two vendors, with a second registry and aggregator beside the first."""
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(3, time_scale=0.001),
        agent={"heartbeat_s": 0.5, "refresh_s": 30.0},
        aggregator={"views_interval_s": 0.2},
    )
    async with LocalFleet(options) as f:
        common = {"nats_url": nats_server.url, "root": root}
        second_registry = Registry(RegistrySettings(**common))
        second_aggregator = Aggregator(AggregatorSettings(**common, views_interval_s=0.2))
        await second_registry.start()
        await second_aggregator.start()
        try:
            yield f
        finally:
            await second_aggregator.stop()
            await second_registry.stop()


def _holders(fleet: LocalFleet, name: str) -> list[str]:
    assert fleet.gateway is not None
    return sorted(a.id for a in fleet.gateway.fleet.with_model(parse_name(name).key))


async def test_views_agree_with_each_server(fleet: LocalFleet) -> None:
    async with ollama.AsyncClient(host=fleet.url) as c:
        await c.generate(model="llama3.2", prompt="hi", options={"num_predict": 2})
        for a in fleet.agents:
            a._wake.refresh.set()
        await until(fleet, lambda: len(fleet.gateway.fleet.loaded_on("llama3.2:latest")) >= 1)  # type: ignore[union-attr]
        tags, ps = await c.list(), await c.ps()
    union: set[str] = set()
    loaded: list[str] = []
    for sim in fleet.sims:
        async with ollama.AsyncClient(host=sim.url) as one:
            union |= {m.model for m in (await one.list()).models if m.model}
            loaded += [m.model for m in (await one.ps()).models if m.model]
    assert sorted(m.model for m in tags.models if m.model) == sorted(union)  # each model once
    assert sorted(m.model for m in ps.models if m.model) == sorted(loaded)  # one row per server
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + "/api/ps") as r:
            rows = (await r.json())["models"]
        assert {row["corral"]["agent"] for row in rows} <= {a.id for a in fleet.agents}
        async with s.get(fleet.url + "/v1/models") as r:
            assert sorted(m["id"] for m in (await r.json())["data"]) == sorted(union)
        async with s.get(fleet.url + "/api/status") as r:
            raw = await r.read()
            status = _status.decode(raw)
    # what Ollama 0.16.2+ answers there (cloud models not disabled), for clients that read it
    assert json.loads(raw)["cloud"] == {"disabled": False, "source": "none"}
    assert status.totals.agents == 3 and {a.vendor for a in status.agents} == {"nvidia", "amd"}
    assert status.totals.vram_total == sum(s.config.total_vram for s in fleet.sims)
    assert status.totals.loaded == len(loaded) and status.totals.models == len(union)


async def test_status_rates_come_from_the_aggregators(fleet: LocalFleet) -> None:
    assert fleet.gateway is not None
    # warm everywhere first: a cold burst that queues gets replica preloads, requests of their own
    await preload(fleet, "llama3.2")
    async with ollama.AsyncClient(host=fleet.url) as c:
        results = await asyncio.gather(
            *(c.generate(model="llama3.2", prompt=f"{i}", options={"num_predict": 5}) for i in range(6))
        )
    tokens = sum(r.eval_count or 0 for r in results)
    assert tokens == 30
    await fleet.gateway.wait_rates(lambda r: r.requests >= 6, timeout=10)
    async with aiohttp.ClientSession() as s, s.get(fleet.url + "/api/status") as r:
        status = _status.decode(await r.read())
    assert status.rates is not None
    assert status.rates.tokens == tokens and status.rates.errors == 0
    assert status.rates.per_model["llama3.2:latest"].requests == 6
    assert status.rates.ttft_ms_p50 is not None and status.rates.ttft_ms_p50 > 0


async def test_pull_with_replicas_merges_progress(fleet: LocalFleet) -> None:
    lines: list[dict[str, object]] = []
    async with aiohttp.ClientSession() as s:
        async with s.post(
            fleet.url + "/api/pull", json={"model": "mistral"}, headers={"X-Corral-Replicas": "2"}
        ) as r:
            assert r.status == 200 and r.content_type == "application/x-ndjson"
            lines = [json.loads(raw) async for raw in r.content if raw.strip()]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    by_digest: dict[str, list[dict[str, object]]] = {}
    for x in lines:
        if x.get("digest"):
            by_digest.setdefault(str(x["digest"]), []).append(x)
    assert by_digest
    for seen in by_digest.values():
        # the first line for a layer comes from one agent; by the end both agents' copies add up
        first, last = seen[0], seen[-1]
        assert last["total"] == 2 * first["total"]  # type: ignore[operator]
        assert last["completed"] == last["total"]
    await until(fleet, lambda: len(_holders(fleet, "mistral")) == 2)
    # every agent, vendor-restricted: only the one AMD server
    async with ollama.AsyncClient(host=fleet.url, headers={"X-Corral-Vendor": "amd"}) as c:
        assert (await c.pull("deepseek-r1:7b")).status == "success"
    await until(fleet, lambda: len(_holders(fleet, "deepseek-r1:7b")) == 1)
    assert fleet.gateway is not None
    (holder,) = fleet.gateway.fleet.with_model(parse_name("deepseek-r1:7b").key)
    assert holder.vendor == "amd"
    async with ollama.AsyncClient(host=fleet.url, headers={"X-Corral-Replicas": "all"}) as c:
        parts = [p async for p in await c.pull("llama3.2:1b", stream=True)]
    assert parts[-1].status == "success"
    await until(fleet, lambda: len(_holders(fleet, "llama3.2:1b")) == 3)
    async with ollama.AsyncClient(host=fleet.url) as c:
        await c.delete("llama3.2:1b")
    await until(fleet, lambda: _holders(fleet, "llama3.2:1b") == [])


async def test_a_failing_agent_makes_the_pull_fail(fleet: LocalFleet) -> None:
    """An agent whose Ollama answers but cannot pull the model (its registry lacks it): its pull
    fails, so the fleet-wide pull must not say success. One whose Ollama does not answer at all is
    no candidate (`tests/unit/test_routing.py`): the pull goes to the others."""
    config = load_config(None, time_scale=0.001)
    config = msgspec.structs.replace(
        config, models=[m for m in config.models if not m.name.startswith("gemma3")]
    )
    sim = SimServer(config, host="127.0.0.1", port=0)
    await sim.start()
    try:
        await fleet.add_agent(Backend(sim.url, "cpu"), agent_id="broken")
        await until(
            fleet, lambda: fleet.gateway is not None and fleet.gateway.fleet.get("broken") is not None
        )
        async with aiohttp.ClientSession() as s:
            async with s.post(
                fleet.url + "/api/pull", json={"model": "gemma3:4b"}, headers={"X-Corral-Replicas": "all"}
            ) as r:
                lines = [json.loads(raw) async for raw in r.content if raw.strip()]
        assert "error" in lines[-1] and "broken" in str(lines[-1]["error"])
        assert not any(x.get("status") == "success" for x in lines)
        with pytest.raises(ollama.ResponseError) as e:
            async with ollama.AsyncClient(host=fleet.url, headers={"X-Corral-Replicas": "all"}) as c:
                await c.pull("gemma3:4b")
        assert "broken" in e.value.error
    finally:
        await sim.stop()


async def test_dead_agent_leaves_every_view_and_comes_back(
    fleet: LocalFleet, events: Events, nats_server: NatsServer, root: str
) -> None:
    for a in fleet.agents:
        await events.wait("joined", a.id)
    victim = fleet.agents[1]
    victim_id = victim.id
    # silence it without a clean stop: its NATS connection goes, its KV entry stays behind
    victim._wake.closing.set()
    assert victim.nc is not None
    await victim.nc.close()
    await events.wait("dead", victim_id)
    assert fleet.gateway is not None
    await until(fleet, lambda: fleet.gateway.fleet.get(victim_id) is None)  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as s, s.get(fleet.url + "/api/status") as r:
        assert victim_id not in {a.id for a in _status.decode(await r.read()).agents}
    # routing avoids it: every request lands on the two others
    async with ollama.AsyncClient(host=fleet.url) as c:
        for i in range(6):
            await c.generate(model="llama3.2", prompt=f"{i}", options={"num_predict": 1})
    # two registries ran, yet the death was announced once
    assert events.of("dead", victim_id) == 1
    # a fresh agent under the same id rejoins without manual steps
    sim = fleet.sims[1]
    back = await fleet.add_agent(Backend(sim.url, sim.config.vendor, 2), agent_id=victim_id)
    await events.wait("joined", back.id, count=2)
    await until(fleet, lambda: fleet.gateway.fleet.get(victim_id) is not None)  # type: ignore[union-attr]


async def test_clean_stop_is_announced_once(fleet: LocalFleet, events: Events) -> None:
    leaving = fleet.agents[0]
    await events.wait("joined", leaving.id)
    await leaving.stop()
    await events.wait("left", leaving.id)
    assert fleet.gateway is not None
    await until(fleet, lambda: fleet.gateway.fleet.get(leaving.id) is None)  # type: ignore[union-attr]
    # a barrier for "never announced dead": an agent silenced after this one left is found dead,
    # so the registries' death checks have run over the leaving agent's silence too
    silenced = fleet.agents[1]
    await events.wait("joined", silenced.id)
    silenced._wake.closing.set()
    assert silenced.nc is not None
    await silenced.nc.close()
    await events.wait("dead", silenced.id)
    assert events.of("left", leaving.id) == 1 and events.of("dead", leaving.id) == 0


async def test_rates_an_aggregator_stopped_rewriting_are_not_shown(
    nats_server: NatsServer, root: str
) -> None:
    """With no aggregator left, the last one's figures would show for good: rates not rewritten
    for five of their aggregator's periods are ``null`` in /api/status and `corral status`."""
    options = FleetOptions(port=0, nats_url=nats_server.url, root=root, sims=default_sims(1), aggregator=None)
    async with LocalFleet(options) as fleet, aiohttp.ClientSession() as s:
        assert fleet.gateway is not None and fleet.gateway.nc is not None
        buckets = await ensure_buckets(fleet.gateway.nc.jetstream(), Subjects(root))

        async def written(every_s: float) -> dict[str, object] | None:
            rates = views.Rates(
                window_s=60,
                requests=7,
                errors=0,
                tokens=70,
                requests_per_s=0.1,
                tokens_per_s=1.0,
                every_s=every_s,
            )
            await buckets.views.put(views.RATES_KEY, msgspec.json.encode(rates))
            assert fleet.gateway is not None
            await fleet.gateway.wait_rates(lambda r: r.every_s == every_s, timeout=10)
            async with s.get(fleet.url + "/api/status") as r:
                return (await r.json())["rates"]

        status = ("status", "--nats", nats_server.url, "--root", root)
        assert (await written(3600.0) or {})["requests"] == 7  # rewritten every hour: current
        assert "req/s" in await corral_ok(*status)
        assert await written(1e-6) is None  # every microsecond, and not since: its aggregator stopped
        shown = await corral_ok(*status)
        assert "req/s" not in shown and "rates: none (no aggregator has written them lately" in shown


async def test_an_agent_may_not_join_under_the_id_of_a_live_one_elsewhere(fleet: LocalFleet) -> None:
    """A second agent started with a live agent's id, beside another Ollama (a host cloned with the
    same name): it stops with why, and the one already there keeps its id, state and requests."""
    held = fleet.agents[0]
    sim = SimServer(load_config(None, time_scale=0.001), host="127.0.0.1", port=0)
    await sim.start()
    try:
        with pytest.raises(IdInUse, match=f"agent id '{held.id}' is in use by a live agent"):
            await fleet.add_agent(Backend(sim.url, "cpu"), agent_id=held.id)
    finally:
        await sim.stop()
    assert fleet.gateway is not None
    shown = fleet.gateway.fleet.get(held.id)
    assert shown is not None and shown.ollama_url == held.state().ollama_url
    async with ollama.AsyncClient(host=fleet.url, headers={"X-Corral-Agent": held.id}) as c:
        assert (await c.generate(model="llama3.2", prompt="still mine", options={"num_predict": 2})).done


async def test_the_same_agent_started_twice_is_refused(fleet: LocalFleet) -> None:
    """A second process under a live agent's id, beside the same Ollama on the same host (a second
    service unit, say): its state there looks like this agent's own left by a crash, but a live
    agent writes it again within a heartbeat, so the newcomer stops before it takes anything."""
    held = fleet.agents[0]
    first = held.state()
    second = Agent(msgspec.structs.replace(held.settings), gpus=list(first.gpus))
    with pytest.raises(IdInUse, match="the same agent started twice"):
        async with asyncio.timeout(30):
            await second.run()
    assert not held.connection_lost
    assert fleet.gateway is not None and fleet.gateway.fleet.get(held.id) is not None


async def test_an_agent_that_finds_an_earlier_process_writing_its_id_gives_way(
    fleet: LocalFleet, root: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two processes under one id that both got in (started in the same instant, or hosts cloned
    with the same name): each write expects the revision of its own last one, and the one started
    later stops at its next write, exit 1, with why, leaving the key to the other."""
    agent = fleet.agents[0]
    gateway = fleet.gateway
    assert gateway is not None and gateway.nc is not None
    agents = (await ensure_buckets(gateway.nc.jetstream(), Subjects(root))).agents
    earlier = msgspec.structs.replace(agent.state(), host="clone", started_at=agent.state().started_at - 60)
    await agents.put(agent.id, agent_state_encoder.encode(earlier))  # the other process's heartbeat
    await until(fleet, lambda: agent.connection_lost, what="the later process gives way")
    await agent.stop()
    assert any("is in use by another agent process on clone" in r.getMessage() for r in caplog.records)
    stored = agent_state_of(agent.id, (await agents.get(agent.id)).value or b"")
    assert stored.host == "clone"  # it wrote nothing more, and its stop deleted nothing
