"""Two gateways, two registries and two aggregators on one NATS, in front of three simulated servers
(NVIDIA and AMD): every view agrees through both gateways, with the servers' own answers and with the
registry's model index; a pull through one gateway shows on the other; a killed agent leaves both
within the dead timeout; nothing is announced twice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import msgspec
import nats
import ollama
import openai
import pytest
from corral.aggregator.aggregator import Aggregator
from corral.aggregator.settings import AggregatorSettings
from corral.gateway.app import Gateway
from corral.gateway.settings import GatewaySettings
from corral.protocol.messages import agent_state_decoder
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.registry.index import Holder, ModelEntry, index_key, model_entry_decoder
from corral.registry.registry import Registry
from corral.registry.settings import RegistrySettings
from corral.runtime.fleet import FleetView, IdInUse
from corral.runtime.natsserver import NatsServer
from corral.runtime.process import AsgiServer
from corral.up import FleetOptions, LocalFleet, default_sims
from corral.views import FleetStatus
from nats.js.kv import KeyValue

from tests.integration.fleet_helpers import Events
from tests.integration.waits import views_hold

pytestmark = pytest.mark.integration

HEARTBEAT_S = 0.5
DEAD_AFTER_S = 2.5  # longer than the gateways' own three heartbeats: the removal is the registry's
SLACK_S = 3.0  # the reaper waking, the delete reaching both watches, a busy machine
LLAMA = "llama3.2:latest"

_status = msgspec.json.Decoder(FleetStatus)


class Watched:
    """The live contents of (part of) a KV bucket, kept by a watch: tests wait on it, never poll."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.values: dict[str, bytes] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, keys: str = ">") -> None:
        watcher = await self.kv.watch(keys)
        self._task = asyncio.create_task(self._follow(watcher))

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation in ("DEL", "PURGE"):
                    self.values.pop(entry.key, None)
                else:
                    self.values[entry.key] = entry.value or b""
                self._changed.set()
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class Pair:
    fleet: LocalFleet
    gateways: tuple[Gateway, Gateway]
    urls: tuple[str, str]
    events: Events
    agents: KeyValue
    index: Watched  # the models bucket's model.* keys
    views: Watched  # what the aggregators write

    def agent_of(self, sim_url: str) -> str:
        return next(a.id for a in self.fleet.agents if a.settings.ollama_url == sim_url)

    async def settle(self, predicate: Callable[[FleetView], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate`` holds for both gateways' fleet views (woken by KV changes)."""
        await views_hold((gw.fleet for gw in self.gateways), predicate, timeout=timeout)

    def entries(self) -> dict[str, ModelEntry]:
        return {k: model_entry_decoder.decode(v) for k, v in self.index.values.items()}


@pytest.fixture
async def pair(nats_server: NatsServer, root: str) -> AsyncIterator[Pair]:
    common = {"nats_url": nats_server.url, "root": root}
    subjects = Subjects(root)
    nc = await nats.connect(nats_server.url)
    events = Events()
    await nc.subscribe(subjects.event("agent"), cb=events.on)
    # the second registry and aggregator start before the agents, so both race for every announcement
    # no probes: the killed agent's removal is the heartbeat rule's (test_agent_vanished.py has the probes')
    registry = Registry(RegistrySettings(**common, dead_after_s=DEAD_AFTER_S, probe_s=0))
    aggregator = Aggregator(AggregatorSettings(**common, views_interval_s=0.2))
    await registry.start()
    await aggregator.start()
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(3, time_scale=0),  # no delays, and models stay loaded
        agent={"heartbeat_s": HEARTBEAT_S, "refresh_s": 30.0},
        registry={"dead_after_s": DEAD_AFTER_S, "probe_s": 0},
        aggregator={"views_interval_s": 0.2},
    )
    js = nc.jetstream()
    try:
        async with LocalFleet(options) as fleet:
            assert fleet.gateway is not None
            second = Gateway(GatewaySettings(**common, port=0))
            http = AsgiServer(second, "127.0.0.1", 0)
            await http.start()
            index = Watched(await js.key_value(subjects.models_bucket))
            views = Watched(await js.key_value(subjects.views_bucket))
            await index.start("model.>")
            await views.start()
            try:
                yield Pair(
                    fleet,
                    (fleet.gateway, second),
                    (fleet.url, http.url),
                    events,
                    await js.key_value(subjects.agents_bucket),
                    index,
                    views,
                )
            finally:
                await index.stop()
                await views.stop()
                await http.stop()
    finally:
        await aggregator.stop()
        await registry.stop()
        await nc.close()


async def load_on(url: str, vendor: str) -> None:
    """Run llama3.2 through the gateway at ``url``, on a server of ``vendor`` and no other."""
    headers = {"X-Load-Balancing-Strategy": vendor, "X-Enforce-Strategy": "true"}
    async with ollama.AsyncClient(host=url, headers=headers) as c:
        r = await c.generate(model="llama3.2", prompt="hi", options={"num_predict": 2})
    assert r.done and r.response


def idle(view: FleetView) -> bool:
    return all(a.in_flight == 0 and a.queued == 0 and not a.loading for a in view.agents())


def loaded_vendors(view: FleetView, key: str = LLAMA) -> set[str]:
    return {a.vendor for a in view.loaded_on(key)}


@dataclass
class Truth:
    """What the simulated servers themselves answer."""

    tags: set[str]  # every model on some server, once
    disk: dict[str, set[str]]  # model key → agents whose server has it
    ps: set[tuple[str, str]]  # (agent, model) for every loaded model on every server


async def ask_servers(pair: Pair) -> Truth:
    truth = Truth(set(), {}, set())
    for sim in pair.fleet.sims:
        agent = pair.agent_of(sim.url)
        async with ollama.AsyncClient(host=sim.url) as c:
            for m in (await c.list()).models:
                assert m.model
                truth.tags.add(m.model)
                truth.disk.setdefault(parse_name(m.model).key, set()).add(agent)
            truth.ps |= {(agent, m.model) for m in (await c.ps()).models if m.model}
    return truth


async def get(url: str, path: str) -> bytes:
    async with aiohttp.ClientSession() as s, s.get(url + path) as r:
        assert r.status == 200, (path, r.status)
        return await r.read()


def steady(status: FleetStatus) -> FleetStatus:
    """A status without what moves by itself (ages, the time it was taken, rolling figures)."""
    rows = [msgspec.structs.replace(r, up_s=0.0, last_seen_s=0.0) for r in status.agents]
    return msgspec.structs.replace(status, agents=rows, at=0.0, rates=None)


def expected_index(pair: Pair, truth: Truth) -> dict[str, ModelEntry]:
    vendor = {a.id: a.vendor for a in pair.fleet.agents}
    loaded: dict[str, set[str]] = {}
    for agent, model in truth.ps:
        loaded.setdefault(parse_name(model).key, set()).add(agent)
    return {
        index_key(parse_name(key).token): ModelEntry(
            model=key,
            disk=tuple(Holder(agent=a, vendor=vendor[a]) for a in sorted(truth.disk.get(key, ()))),
            loaded=tuple(Holder(agent=a, vendor=vendor[a]) for a in sorted(loaded.get(key, ()))),
        )
        for key in truth.disk.keys() | loaded.keys()
    }


async def test_every_view_agrees_through_both_gateways(pair: Pair) -> None:
    a, b = pair.urls
    # a request through each gateway: llama3.2 ends up loaded on an NVIDIA and on the AMD server
    await load_on(a, "nvidia")
    await load_on(b, "amd")
    await pair.settle(lambda v: loaded_vendors(v) == {"amd", "nvidia"} and idle(v))
    truth = await ask_servers(pair)
    running_llama = {agent for agent, model in truth.ps if model == LLAMA}
    assert len(running_llama) >= 2 and running_llama == {
        x.id for x in pair.gateways[0].fleet.loaded_on(LLAMA)
    }

    bodies = {
        path: [await get(url, path) for url in pair.urls] for path in ("/api/tags", "/api/ps", "/v1/models")
    }
    for path, (one, two) in bodies.items():
        assert one == two, path  # both gateways say exactly the same
    for url in pair.urls:
        async with ollama.AsyncClient(host=url) as c:
            tags, ps = await c.list(), await c.ps()
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused") as o:
            v1 = [m.id async for m in o.models.list()]
        assert sorted(m.model for m in tags.models if m.model) == sorted(truth.tags)  # each model once
        assert sorted(m.model for m in ps.models if m.model) == sorted(model for _, model in truth.ps)
        assert sorted(v1) == sorted(truth.tags)
    rows = msgspec.json.decode(bodies["/api/ps"][0])["models"]
    assert {(r["corral"]["agent"], r["model"]) for r in rows} == truth.ps  # one row per agent and model
    vendor_of = {x.id: x.vendor for x in pair.fleet.agents}
    llama_rows = [r["corral"] for r in rows if r["model"] == LLAMA]  # one per server running it
    assert sorted(r["agent"] for r in llama_rows) == sorted(running_llama)
    assert {r["vendor"] for r in llama_rows} == {"amd", "nvidia"}
    assert all(r["corral"]["vendor"] == vendor_of[r["corral"]["agent"]] for r in rows)

    # /api/status: the same fleet through both, and what the servers say
    await asyncio.gather(*(gw.wait_rates(lambda r: r.tokens == 4, timeout=10) for gw in pair.gateways))
    one, two = [_status.decode(await get(url, "/api/status")) for url in pair.urls]
    assert steady(one) == steady(two)
    assert one.rates is not None and two.rates is not None
    assert (one.rates.requests, one.rates.errors) == (two.rates.requests, two.rates.errors)
    assert one.rates.requests >= 2 and one.rates.errors == 0 and one.rates.tokens == two.rates.tokens == 4
    assert one.totals.agents == 3 and {r.vendor for r in one.agents} == {"nvidia", "amd"}
    assert one.totals.vram_total == sum(s.config.total_vram for s in pair.fleet.sims)
    assert one.totals.models == len(truth.tags) and one.totals.loaded == len(truth.ps)
    assert {(r.id, m.model) for r in one.agents for m in r.loaded} == truth.ps

    # the aggregators' copies in the views bucket say the same as the gateways
    await pair.views.wait(
        lambda: all(
            pair.views.values.get(k) == bodies[p][0]
            for k, p in (("tags", "/api/tags"), ("ps", "/api/ps"), ("v1_models", "/v1/models"))
        )
    )
    # and the registries' model index says who has what, with vendors
    want = expected_index(pair, truth)
    await pair.index.wait(lambda: pair.entries() == want)
    llama = want[index_key(parse_name(LLAMA).token)]
    assert len(llama.disk) == 3 and {h.vendor for h in llama.loaded} == {"amd", "nvidia"}


async def test_a_pull_through_one_gateway_shows_on_the_other(pair: Pair) -> None:
    a, b = pair.urls
    mistral = parse_name("mistral").key
    marker = "loading." + parse_name("mistral").token  # a key someone else owns in the same bucket
    await pair.index.kv.put(marker, b"placement")
    async with ollama.AsyncClient(host=a, headers={"X-Corral-Replicas": "2"}) as c:
        assert (await c.pull("mistral")).status == "success"
    await pair.settle(lambda v: len(v.with_model(mistral)) == 2)
    holders = [sorted(x.id for x in gw.fleet.with_model(mistral)) for gw in pair.gateways]
    truth = await ask_servers(pair)
    assert holders[0] == holders[1] == sorted(truth.disk[mistral])
    tags = [await get(url, "/api/tags") for url in pair.urls]
    assert tags[0] == tags[1]
    async with ollama.AsyncClient(host=b) as c:
        assert "mistral:latest" in {m.model for m in (await c.list()).models}
        r = await c.generate(model="mistral", prompt="hi", options={"num_predict": 1})  # it runs there
        assert r.done
    key = index_key(parse_name("mistral").token)
    await pair.index.wait(lambda: key in pair.entries() and len(pair.entries()[key].disk) == 2)
    assert [h.agent for h in pair.entries()[key].disk] == holders[0]

    # deleted through the other gateway: gone from disk everywhere; the server that ran it keeps it
    # in memory, as Ollama does, and the index says exactly that
    async with ollama.AsyncClient(host=b) as c:
        await c.delete("mistral")
    await pair.settle(lambda v: v.with_model(mistral) == [])
    truth = await ask_servers(pair)
    assert mistral not in truth.disk and [m for _, m in truth.ps if m == "mistral:latest"] == [
        "mistral:latest"
    ]
    for url in pair.urls:
        async with ollama.AsyncClient(host=url) as c:
            assert "mistral:latest" not in {m.model for m in (await c.list()).models}
    want = expected_index(pair, truth)
    await pair.index.wait(lambda: pair.entries() == want)
    assert want[key].disk == () and len(want[key].loaded) == 1
    assert (await pair.index.kv.get(marker)).value == b"placement"  # not the index's to touch


async def test_a_killed_agent_leaves_both_gateways_within_the_dead_timeout(pair: Pair) -> None:
    a, b = pair.urls
    fleet, events = pair.fleet, pair.events
    for x in fleet.agents:
        await events.wait("joined", x.id)
    await load_on(a, "nvidia")
    await load_on(b, "amd")
    deepseek = parse_name("deepseek-r1:7b").key
    async with ollama.AsyncClient(host=a, headers={"X-Corral-Vendor": "amd"}) as c:
        assert (await c.pull("deepseek-r1:7b")).status == "success"  # only the AMD server has it
    await pair.settle(lambda v: loaded_vendors(v) == {"amd", "nvidia"} and len(v.with_model(deepseek)) == 1)
    deepseek_key = index_key(parse_name(deepseek).token)
    await pair.index.wait(lambda: deepseek_key in pair.index.values)
    victim = next(x for x in fleet.agents if x.vendor == "amd")
    survivors = sorted(x.id for x in fleet.agents if x is not victim)

    # killed: its NATS connection goes at once, its state stays behind in the bucket
    victim._wake.closing.set()
    assert victim.nc is not None
    await victim.nc.close()
    last_heard = agent_state_decoder.decode((await pair.agents.get(victim.id)).value or b"").updated_at
    await pair.settle(lambda v: v.get(victim.id) is None, timeout=DEAD_AFTER_S + SLACK_S)
    assert time.time() - last_heard >= DEAD_AFTER_S  # the registry waited as long as it was told

    # gone from every view through both gateways, and from the index
    bodies = {
        path: [await get(url, path) for url in pair.urls] for path in ("/api/tags", "/api/ps", "/v1/models")
    }
    for path, (one, two) in bodies.items():
        assert one == two, path
    rows = msgspec.json.decode(bodies["/api/ps"][0])["models"]
    assert {r["corral"]["vendor"] for r in rows if r["model"] == LLAMA} == {"nvidia"}
    assert "deepseek-r1:7b" not in {m["model"] for m in msgspec.json.decode(bodies["/api/tags"][0])["models"]}
    statuses = [_status.decode(await get(url, "/api/status")) for url in pair.urls]
    for status in statuses:
        assert sorted(r.id for r in status.agents) == survivors and status.totals.agents == 2
    await pair.index.wait(lambda: deepseek_key not in pair.index.values)
    assert all(victim.id not in {h.agent for h in e.disk + e.loaded} for e in pair.entries().values())
    await pair.views.wait(lambda: pair.views.values.get("tags") == bodies["/api/tags"][0])

    # requests through both gateways still succeed, an AMD pin included (it falls back to NVIDIA)
    for url in pair.urls:
        async with ollama.AsyncClient(host=url) as c:
            for i in range(3):
                r = await c.generate(model="llama3.2", prompt=f"{i}", options={"num_predict": 1})
                assert r.done
            r = await c.generate(model="amd/llama3.2", prompt="hi", options={"num_predict": 1})
            assert r.done and r.model == "amd/llama3.2"

    # two registries ran all along, yet every agent joined once and the death was announced once
    assert [events.of("joined", x.id) for x in fleet.agents] == [1, 1, 1]
    assert events.of("dead", victim.id) == 1 and events.of("left", victim.id) == 0


async def test_a_second_gateway_under_a_running_ones_id_does_not_start(
    nats_server: NatsServer, root: str
) -> None:
    """Two gateways with one --gateway-id take each other's answers for requests they never sent,
    and cancel them: every request fails. The second says so and stops; another id starts."""
    common = {"nats_url": nats_server.url, "root": root}
    first = Gateway(GatewaySettings(**common, port=0, gateway_id="samegw"))
    await first.start()
    try:
        second = Gateway(GatewaySettings(**common, port=0, gateway_id="samegw"))
        try:
            with pytest.raises(
                IdInUse, match="gateway id 'samegw' is in use: something listens on its replies"
            ):
                await second.start()
        finally:
            await second.stop()
        third = Gateway(GatewaySettings(**common, port=0, gateway_id="othergw"))
        await third.start()
        await third.stop()
    finally:
        await first.stop()
