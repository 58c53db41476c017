"""The model index writer on a real JetStream KV bucket: two writers at once, compare-and-set, keys
it does not own, following the agents bucket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from corral.protocol.subjects import Subjects
from corral.registry.index import ModelEntry, ModelIndexWriter, model_index
from corral.runtime.buckets import ensure_buckets
from corral.runtime.kvwatch import snapshot
from corral.runtime.natsserver import NatsServer
from nats.js.kv import KeyValue

from tests.integration import waits
from tests.unit.test_model_index import agent

pytestmark = pytest.mark.integration


@pytest.fixture
async def bucket(nats_server: NatsServer, root: str) -> AsyncIterator[tuple[KeyValue, KeyValue]]:
    nc = await nats.connect(nats_server.url)
    try:
        b = await ensure_buckets(nc.jetstream(), Subjects(root))
        yield b.agents, b.models
    finally:
        await nc.close()


async def contents(kv: KeyValue) -> dict[str, bytes]:
    return {e.key: e.value or b"" for e in await snapshot(kv)}


def encoded(index: dict[str, ModelEntry]) -> dict[str, bytes]:
    return {k: msgspec.json.encode(v) for k, v in index.items()}


FLEET = [
    agent("nvidia-0", "nvidia", ["llama3.2", "qwen3:8b"], ["llama3.2"]),
    agent("amd-1", "amd", ["llama3.2"], ["llama3.2"]),
]


async def test_writes_what_changed_and_only_model_keys(bucket: tuple[KeyValue, KeyValue]) -> None:
    agents, models = bucket
    await models.put("loading.llama3=2E2=3Alatest", b"someone else's")
    await models.put("model.stale", b"{}")  # an entry of a model nobody has any more
    w = ModelIndexWriter(agents, models)
    index = model_index(FLEET)
    assert await w.write(index) == len(index) + 1  # two entries written, the stale one deleted
    assert await contents(models) == encoded(index) | {"loading.llama3=2E2=3Alatest": b"someone else's"}
    revisions = {k: (await models.get(k)).revision for k in index}
    assert await w.write(model_index(FLEET)) == 0  # unchanged: nothing rewritten
    assert {k: (await models.get(k)).revision for k in index} == revisions
    # amd-1 unloads, nvidia-0 loses qwen3: one rewrite, one delete
    fleet = [agent("nvidia-0", "nvidia", ["llama3.2"], ["llama3.2"]), agent("amd-1", "amd", ["llama3.2"])]
    assert await w.write(model_index(fleet)) == 2
    assert await contents(models) == encoded(model_index(fleet)) | {
        "loading.llama3=2E2=3Alatest": b"someone else's"
    }
    assert await w.write({}) == 1
    assert await contents(models) == {"loading.llama3=2E2=3Alatest": b"someone else's"}


async def test_two_writers_write_each_change_once(bucket: tuple[KeyValue, KeyValue]) -> None:
    agents, models = bucket
    one, two = ModelIndexWriter(agents, models), ModelIndexWriter(agents, models)
    index = model_index(FLEET)
    written = await asyncio.gather(one.write(index), two.write(index))
    assert sum(written) == len(index)  # whoever lost a compare-and-set found the same entry there
    assert await contents(models) == encoded(index)
    changed = model_index([FLEET[0]])  # amd-1 is gone
    assert sum(await asyncio.gather(two.write(changed), one.write(changed))) == 1
    assert await contents(models) == encoded(changed)
    # a restarted writer reads what is there and rewrites nothing
    assert await ModelIndexWriter(agents, models).write(changed) == 0


async def test_a_writer_with_old_revisions_still_ends_on_its_view(bucket: tuple[KeyValue, KeyValue]) -> None:
    agents, models = bucket
    one, two = ModelIndexWriter(agents, models), ModelIndexWriter(agents, models)
    s0, s1, s2 = model_index(FLEET), model_index([FLEET[0]]), model_index([FLEET[1]])
    assert await one.write(s0) == 2 and await two.write(s0) == 0
    assert await one.write(s1) == 1  # two's revision of the llama3.2 entry is now out of date
    # two's compare-and-set on llama3.2 fails; it reads the entry again and writes over it
    assert await two.write(s2) == 2  # llama3.2 rewritten, qwen3:8b deleted
    assert await contents(models) == encoded(s2)
    # one is behind on both keys: each compare-and-set fails, and what it finds is what it wants
    assert await one.write(s2) == 0
    assert await contents(models) == encoded(s2)


async def test_the_writer_follows_the_agents_bucket(bucket: tuple[KeyValue, KeyValue]) -> None:
    agents, models = bucket
    enc = msgspec.json.Encoder()
    await agents.put("nvidia-0", enc.encode(FLEET[0]))
    w = ModelIndexWriter(agents, models)
    await w.start()
    watcher = await models.watch("model.>")
    seen: dict[str, bytes | None] = {}
    events = 0

    def present() -> dict[str, bytes]:
        return {k: v for k, v in seen.items() if v is not None}

    async def next_entry(timeout: float) -> None:
        nonlocal events
        entry = await watcher.updates(timeout=timeout)
        if entry is not None:
            events += 1
            seen[entry.key] = None if entry.operation in ("DEL", "PURGE") else entry.value

    async def until(want: dict[str, bytes]) -> None:
        await waits.until(
            lambda: present() == want, next_entry, timeout=10, what=f"the index holds {want}", state=present
        )

    try:
        await until(encoded(model_index([FLEET[0]])))
        await agents.put("amd-1", enc.encode(FLEET[1]))
        await until(encoded(model_index(FLEET)))
        before = events
        heartbeat = msgspec.structs.replace(FLEET[1], updated_at=99.0, in_flight=2)
        await agents.put("amd-1", enc.encode(heartbeat))  # changes no model: writes nothing
        await agents.delete("nvidia-0")  # gone: its qwen3 entry goes, llama3.2 keeps amd-1
        await until(encoded(model_index([heartbeat])))
        assert events == before + 2  # one rewrite, one delete, and nothing for the heartbeat
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
        await w.stop()
