"""Load markers expire: the pure rule (`marker_expired`), the registry's pruning of its KV markers
(by compare-and-set on the revision read) and the gateway's own marker map; and ``num_ctx`` capped
at the model's trained context (`route_ctx`), so contexts Ollama runs alike share one marker."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import pytest
from corral.gateway.placement import Loads
from corral.protocol.messages import AgentState, LoadMarker, PsModel, TagModel
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.registry import placement
from corral.registry.placement import Placer, marker_key
from corral.routing import Route, Router, marker_expired, route_ctx
from corral.transport import WorkRequest
from nats.js.errors import BadRequestError, KeyNotFoundError

from tests.unit.test_routing import GB, OTHER
from tests.unit.test_routing import MODEL as ROUTING_MODEL
from tests.unit.test_routing import agent as routing_agent

MODEL = "llama3.2:latest"
NAME = parse_name(MODEL)
KEY = NAME.key
TTL = {"grace_s": 1.0, "ttl_s": 300.0}


def state(
    agent_id: str = "a", *, loaded_ctx: int = 0, loading_ctx: int | None = None, trained: int = 0
) -> AgentState:
    """An agent with the model on disk; loaded at ``loaded_ctx`` or loading for ``loading_ctx``."""
    tag = TagModel(name=MODEL, model=MODEL, modified_at="", size=1, digest="d")
    ps = PsModel(
        name=MODEL, model=MODEL, size=1, digest="d", expires_at="", size_vram=1, context_length=loaded_ctx
    )
    return AgentState(
        id=agent_id,
        vendor="nvidia",
        host="h",
        ollama_url="http://h",
        models=(tag,),
        loaded=(ps,) if loaded_ctx else (),
        loading=(KEY,) if loading_ctx is not None else (),
        loading_ctx={KEY: loading_ctx} if loading_ctx is not None else {},
        trained_ctx={KEY: trained} if trained else {},
    )


# -- the rule ----------------------------------------------------------------------------------
ROUTE = Route(key=KEY, num_ctx=4096)


def test_a_young_marker_whose_load_the_agent_does_not_show_yet_stays() -> None:
    assert not marker_expired(ROUTE, state(), alive=True, age_s=0.5, **TTL)


def test_a_marker_stays_while_its_agent_shows_the_load() -> None:
    assert not marker_expired(ROUTE, state(loading_ctx=4096), alive=True, age_s=60.0, **TTL)


def test_a_marker_expires_once_its_runner_is_warm() -> None:
    assert marker_expired(ROUTE, state(loaded_ctx=4096), alive=True, age_s=0.1, **TTL)


def test_a_marker_expires_when_the_load_failed() -> None:
    """Past the grace the agent no longer shows the load (or shows one for another context)."""
    assert marker_expired(ROUTE, state(), alive=True, age_s=2.0, **TTL)
    assert marker_expired(ROUTE, state(loading_ctx=8192), alive=True, age_s=2.0, **TTL)
    assert marker_expired(ROUTE, state(loaded_ctx=8192), alive=True, age_s=2.0, **TTL)


def test_a_marker_expires_with_its_agent() -> None:
    assert marker_expired(ROUTE, None, alive=False, age_s=0.1, **TTL)
    assert marker_expired(ROUTE, state(loading_ctx=4096), alive=False, age_s=0.1, **TTL)


def test_no_marker_outlives_the_bound() -> None:
    assert marker_expired(ROUTE, state(loading_ctx=4096), alive=True, age_s=300.0, **TTL)


# -- num_ctx capped at the trained context -------------------------------------------------------
def test_contexts_above_the_trained_one_are_routed_as_the_trained_one() -> None:
    fleet = [state("a"), state("b", loaded_ctx=8192, trained=8192)]
    assert {route_ctx(KEY, n, fleet) for n in (32768, 65536, 131072)} == {8192}
    assert route_ctx(KEY, 4096, fleet) == 4096
    assert route_ctx(KEY, None, fleet) is None


def test_an_unknown_trained_context_caps_nothing() -> None:
    assert route_ctx(KEY, 65536, [state("a")]) == 65536
    assert route_ctx(KEY, 65536, []) == 65536


# -- the registry's KV markers ---------------------------------------------------------------------
class Fleet:
    def __init__(self, *agents: AgentState) -> None:
        self.agents = {a.id: a for a in agents}

    def with_model(self, key: str) -> list[AgentState]:
        return list(self.agents.values())

    def get(self, agent_id: str) -> AgentState | None:
        return self.agents.get(agent_id)

    def alive(self, state: AgentState) -> bool:
        return True


@dataclass
class Entry:
    value: bytes
    revision: int
    key: str = ""


@pytest.fixture(autouse=True)
def listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The placer lists markers with `corral.runtime.kvwatch.snapshot`: here, the fake's listing."""

    async def snapshot(kv: KV, keys: str, *, timeout: float | None = None) -> list[Entry]:
        return kv.listing(keys)

    monkeypatch.setattr(placement, "snapshot", snapshot)


class KV:
    """A models bucket with compare-and-set deletes; ``overwrite`` rewrites a key between the
    listing and the delete that follows it (a newer marker written meanwhile)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.revision = 0
        self.overwrite: str | None = None

    def put(self, key: str, marker: LoadMarker) -> None:
        self.revision += 1
        self.entries[key] = Entry(msgspec.json.encode(marker), self.revision, key)

    def listing(self, keys: str) -> list[Entry]:
        assert keys == "loading.>"
        listed = [Entry(e.value, e.revision, k) for k, e in self.entries.items()]
        if self.overwrite is not None:
            self.put(self.overwrite, LoadMarker(agent="b", at=time.time()))
        return listed

    async def get(self, key: str) -> Entry:
        if key not in self.entries:
            raise KeyNotFoundError()
        return self.entries[key]

    async def create(self, key: str, value: bytes) -> int:
        self.revision += 1
        self.entries[key] = Entry(value, self.revision, key)
        return self.revision

    async def delete(self, key: str, last: int) -> bool:
        if self.entries[key].revision != last:
            raise BadRequestError()
        del self.entries[key]
        return True


def placer(kv: KV, *agents: AgentState) -> Placer:
    return Placer(None, Subjects("t"), Fleet(*agents), kv, None)  # type: ignore[arg-type]


async def test_the_registry_deletes_the_markers_that_did_their_work() -> None:
    kv = KV()
    now = time.time()
    token = NAME.token
    kv.put(marker_key(token, 2048), LoadMarker(agent="a", at=now))  # done: runner warm
    kv.put(marker_key(token, 4096), LoadMarker(agent="b", at=now))  # under way at b
    kv.put(marker_key(token, 8192), LoadMarker(agent="a", at=now - 10))  # failed: a shows no load
    kv.put(marker_key(token, 16384), LoadMarker(agent="gone", at=now))  # agent left the fleet
    kv.put(marker_key(token, 512), LoadMarker(agent="c", at=now))  # just sent: agent lags
    kv.put(marker_key(token, 1024, "amd"), LoadMarker(agent="b", at=now - 400))  # past the bound
    p = placer(kv, state("a", loaded_ctx=2048), state("b", loading_ctx=4096), state("c"))
    assert await p.prune_markers() == 4
    assert sorted(kv.entries) == sorted([marker_key(token, 4096), marker_key(token, 512)])
    assert await p.prune_markers() == 0


async def test_a_newer_marker_is_never_deleted() -> None:
    kv = KV()
    key = marker_key(NAME.token, 2048)
    kv.put(key, LoadMarker(agent="a", at=time.time()))
    kv.overwrite = key  # a new load's marker lands between the listing and the delete
    assert await placer(kv, state("a", loaded_ctx=2048)).prune_markers() == 0
    assert kv.entries[key].revision == 2


async def test_the_markers_this_registry_wrote_are_pruned_without_listing_the_bucket() -> None:
    kv = KV()
    token = NAME.token
    p = placer(kv, state("a", loaded_ctx=2048), state("b", loading_ctx=4096))
    assert await p._claim(token, 2048, "a") is None  # its load is done: a's runner is warm
    assert await p._claim(token, 4096, "b") is None  # under way at b
    kv.put(marker_key(token, 8192), LoadMarker(agent="gone", at=time.time()))  # another registry's

    def no_listing(keys: str) -> list[Entry]:
        raise AssertionError("listed the bucket")

    kv.listing = no_listing  # type: ignore[method-assign]
    assert await p.prune_markers(mine=True) == 1
    assert sorted(kv.entries) == sorted([marker_key(token, 4096), marker_key(token, 8192)])
    assert await p.prune_markers(mine=True) == 0  # the deleted one is forgotten


async def test_no_markers_no_work() -> None:
    assert await placer(KV()).prune_markers() == 0


# -- the gateway's own markers -------------------------------------------------------------------------
class NoRegistry:
    async def request(self, *args: Any, **kwargs: Any) -> Any:
        raise nats.errors.NoRespondersError()


@pytest.mark.parametrize("done", ["warm", "failed"])
async def test_the_gateways_markers_do_not_grow_with_the_contexts_asked_for(done: str) -> None:
    """Twenty contexts, each loaded in turn: the map keeps only the load under way."""
    agent = state("a")
    fleet = Fleet(agent)
    loads = Loads(NoRegistry(), Subjects("t"), fleet, grace_s=0.0 if done == "failed" else 60.0)  # type: ignore[arg-type]
    for i in range(20):
        ctx = 2048 + 256 * i
        req = WorkRequest("/api/generate", b"{}", model=NAME, num_ctx=ctx)
        target, mine = await loads.place(req, Route(key=KEY, num_ctx=ctx), agent, set())
        assert target is agent and mine
        if done == "warm":  # the load is done: the agent shows the runner
            fleet.agents["a"] = agent = state("a", loaded_ctx=ctx)
        assert loads.marked == 1


async def test_a_load_the_gateway_sent_takes_its_memory_until_the_agent_shows_it() -> None:
    """With no registry the gateway places cold loads itself: the one it sent to ``a`` moments ago
    leaves too little room there for the next cold model, so that one goes to ``b``, where without
    the count the two agents tie and ``a`` (first by id) would be asked to evict a model loading."""
    big = 12 * GB

    def two_models(agent_id: str) -> AgentState:
        a = routing_agent(agent_id, size=big)
        other = TagModel(name=OTHER, model=OTHER, modified_at="", size=big, digest="d")
        return msgspec.structs.replace(a, models=(*a.models, other))

    a, b = two_models("a"), two_models("b")
    fleet = Fleet(a, b)
    loads = Loads(NoRegistry(), Subjects("t"), fleet, grace_s=60.0)  # type: ignore[arg-type]
    assert loads.as_placed([a, b]) == [a, b]  # nothing sent yet
    cold = Route(key=parse_name(OTHER).key)
    assert [x.id for x in Router().rank("auto", cold, [a, b], {})] == ["a", "b"]
    req = WorkRequest("/api/generate", b"{}", model=parse_name(ROUTING_MODEL))
    target, mine = await loads.place(req, Route(key=parse_name(ROUTING_MODEL).key), a, set())
    assert target is a and mine
    placed = loads.as_placed([a, b])
    assert placed[0].loading == (parse_name(ROUTING_MODEL).key,) and placed[1] is b
    assert [x.id for x in Router().rank("auto", cold, placed, {})] == ["b", "a"]
    # the agent shows the load now: counted once, as the agent tells it
    shown = msgspec.structs.replace(a, loading=(parse_name(ROUTING_MODEL).key,))
    assert loads.as_placed([shown, b])[0] == shown
