"""Placements decided faster than agents publish: the registry counts the loads it placed moments
ago (its load markers, in a real JetStream bucket) against each agent's memory and against the
models its Ollama keeps at once, though the agents' states do not show them yet."""

from __future__ import annotations

from collections import Counter

import pytest
from corral.protocol.messages import AgentState, Gpu, TagModel
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.registry.placement import Placer
from corral.runtime.buckets import ensure_buckets
from corral.runtime.nats import connect
from corral.runtime.natsserver import NatsServer

pytestmark = pytest.mark.integration

GB = 1_000_000_000
GIB = 1 << 30


def holder(agent_id: str, vram: int, models: dict[str, int]) -> AgentState:
    """An idle agent with nothing loaded and ``models`` (name → file size) on disk."""
    tags = tuple(TagModel(name=n, model=n, modified_at="", size=size, digest=n) for n, size in models.items())
    gpu = Gpu(index=0, name="gpu", vendor="nvidia", vram_total=vram, vram_free=vram)
    return AgentState(
        id=agent_id, vendor="nvidia", host=agent_id, ollama_url="http://h", gpus=(gpu,), models=tags
    )


class Snapshot:
    """The fleet as the registry last heard of it: these states, unchanged while it places."""

    def __init__(self, *agents: AgentState) -> None:
        self.agents = {a.id: a for a in agents}

    def with_model(self, key: str) -> list[AgentState]:
        return [a for a in self.agents.values() if any(parse_name(t.name).key == key for t in a.models)]

    def get(self, agent_id: str) -> AgentState | None:
        return self.agents.get(agent_id)

    def alive(self, state: AgentState) -> bool:
        return True


async def placed(nats_server: NatsServer, root: str, fleet: Snapshot, names: list[str]) -> list[str]:
    """Where a registry places a load of each of ``names``, asked one after the other."""
    nc = await connect(nats_server.url, name="test")
    try:
        subjects = Subjects(root)
        buckets = await ensure_buckets(nc.jetstream(), subjects)
        placer = Placer(nc, subjects, fleet, buckets.models, None)  # type: ignore[arg-type]
        out = []
        for name in names:
            key = parse_name(name).key
            answer = await placer.place(key, parse_name(name).token, None, False, None)
            assert answer.mine
            out.append(answer.agent)
        return out
    finally:
        await nc.close()


async def test_a_fourth_model_placed_at_once_goes_where_ollama_need_not_unload_one(
    nats_server: NatsServer, root: str
) -> None:
    names = [f"small{i}:latest" for i in range(4)]
    models = dict.fromkeys(names, 1 * GB)
    fleet = Snapshot(holder("a", 48 * GIB, models), holder("b", 48 * GIB, models))
    where = Counter(await placed(nats_server, root, fleet, names))
    assert where == {"a": 3, "b": 1}  # Ollama keeps three models per GPU: a fourth on "a" unloads one


async def test_a_second_big_model_placed_at_once_goes_where_it_fits(
    nats_server: NatsServer, root: str
) -> None:
    names = ["big0:latest", "big1:latest"]
    models = dict.fromkeys(names, 14 * GB)
    fleet = Snapshot(holder("a", 24 * GIB, models), holder("b", 24 * GIB, models))
    assert await placed(nats_server, root, fleet, names) == ["a", "b"]  # both on "a" would not fit
