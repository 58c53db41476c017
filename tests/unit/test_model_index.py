"""The model index: the pure function from agent states to ``model.*`` entries, and its writer on
a real JetStream KV bucket (two writers at once, compare-and-set, keys it does not own)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence

import msgspec
import nats
import pytest
from corral.protocol.messages import AgentState, ModelDetails, PsModel, TagModel
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.registry.index import (
    Holder,
    ModelEntry,
    ModelIndexWriter,
    holdings,
    index_key,
    model_entry_decoder,
    model_index,
)
from corral.runtime.nats import ensure_buckets
from corral.runtime.natsserver import NatsServer
from nats.js.kv import KeyValue

DIGEST = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"
KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")  # what JetStream accepts as a key


def tag(name: str) -> TagModel:
    return TagModel(
        name=name,
        model=name,
        modified_at="2025-01-01T00:00:00Z",
        size=1,
        digest=DIGEST,
        details=ModelDetails(),
    )


def ps(name: str, expires_at: str = "2025-01-01T00:05:00Z", size_vram: int = 1) -> PsModel:
    return PsModel(name=name, model=name, size=1, digest=DIGEST, expires_at=expires_at, size_vram=size_vram)


def agent(
    agent_id: str, vendor: str, disk: Sequence[str], loaded: Sequence[str] = (), **extra: object
) -> AgentState:
    return AgentState(
        id=agent_id,
        vendor=vendor,
        host="h",
        ollama_url="http://h:11434",
        models=tuple(tag(n) for n in disk),
        loaded=tuple(ps(n) for n in loaded),
        **extra,  # type: ignore[arg-type]
    )


def key(name: str) -> str:
    return index_key(parse_name(name).token)


# -- the pure part ---------------------------------------------------------------------------------
def test_one_entry_per_model_with_holders_sorted_and_vendors_kept() -> None:
    fleet = [
        agent("nvidia-2", "nvidia", ["llama3.2:latest", "qwen3:8b"], ("llama3.2:latest",)),
        agent("amd-1", "amd", ["llama3.2:latest"], ("llama3.2:latest",)),
        agent("nvidia-0", "nvidia", ["llama3.2:latest", "all-minilm:latest"]),
    ]
    index = model_index(fleet)
    assert list(index) == sorted(index)
    assert set(index) == {key("llama3.2"), key("qwen3:8b"), key("all-minilm")}
    assert index[key("llama3.2")] == ModelEntry(
        model="llama3.2:latest",
        disk=(
            Holder(agent="amd-1", vendor="amd"),
            Holder(agent="nvidia-0", vendor="nvidia"),
            Holder(agent="nvidia-2", vendor="nvidia"),
        ),
        loaded=(Holder(agent="amd-1", vendor="amd"), Holder(agent="nvidia-2", vendor="nvidia")),
    )
    assert index[key("qwen3:8b")] == ModelEntry(
        model="qwen3:8b", disk=(Holder(agent="nvidia-2", vendor="nvidia"),)
    )


def test_keys_are_model_tokens_under_model_dot() -> None:
    fleet = [agent("a", "cpu", ["llama3.2:latest", "hf.co/User/Repo:Q4_K_M", "namespace/m:1.5b"])]
    index = model_index(fleet)
    assert key("llama3.2") == "model.llama3=2E2=3Alatest"
    assert set(index) == {key("llama3.2"), key("hf.co/User/Repo:Q4_K_M"), key("namespace/m:1.5b")}
    for k, entry in index.items():
        assert KV_KEY.fullmatch(k) and k.startswith("model.")
        assert k == key(entry.model)
    assert index[key("hf.co/User/Repo:Q4_K_M")].model == "hf.co/user/repo:q4_k_m"


def test_spellings_of_one_model_are_one_entry() -> None:
    fleet = [
        agent("a", "nvidia", ["Llama3.2"]),
        agent("b", "amd", ["registry.ollama.ai/library/llama3.2:latest"]),
    ]
    (entry,) = model_index(fleet).values()
    assert entry.model == "llama3.2:latest" and [h.agent for h in entry.disk] == ["a", "b"]


def test_loaded_without_disk_still_has_an_entry_and_bad_names_are_skipped() -> None:
    fleet = [agent("a", "amd", ["not a name!", "x/y/z/w"], ["gemma3:4b"])]
    assert model_index(fleet) == {
        key("gemma3:4b"): ModelEntry(model="gemma3:4b", loaded=(Holder(agent="a", vendor="amd"),))
    }


def test_empty_fleet_has_no_entries() -> None:
    assert model_index([]) == {}
    assert model_index([agent("a", "cpu", [])]) == {}


def test_a_heartbeat_changes_neither_holdings_nor_the_encoded_entries() -> None:
    before = agent("a", "nvidia", ["qwen3:8b", "llama3.2"], ["llama3.2"], updated_at=1.0, in_flight=0)
    after = msgspec.structs.replace(
        before,
        models=tuple(reversed(before.models)),  # Ollama may list them in another order
        loaded=(ps("llama3.2", expires_at="2025-01-01T00:09:00Z", size_vram=2),),
        updated_at=2.0,
        in_flight=3,
        queued=1,
    )
    assert holdings(before) == holdings(after)
    enc = msgspec.json.Encoder()
    assert {k: enc.encode(v) for k, v in model_index([before]).items()} == {
        k: enc.encode(v) for k, v in model_index([after]).items()
    }
    assert holdings(msgspec.structs.replace(after, loaded=())) != holdings(before)
    assert holdings(msgspec.structs.replace(after, vendor="amd")) != holdings(before)


def test_entries_round_trip_as_json_with_empty_lists_spelled_out() -> None:
    entry = ModelEntry(model="gemma3:4b", loaded=(Holder(agent="a", vendor="amd"),))
    raw = msgspec.json.encode(entry)
    assert msgspec.json.decode(raw) == {
        "model": "gemma3:4b",
        "disk": [],
        "loaded": [{"agent": "a", "vendor": "amd"}],
    }
    assert model_entry_decoder.decode(raw) == entry


# -- the writer, on a real bucket ------------------------------------------------------------------
@pytest.fixture
async def bucket(nats_server: NatsServer, root: str) -> AsyncIterator[tuple[KeyValue, KeyValue]]:
    nc = await nats.connect(nats_server.url)
    try:
        b = await ensure_buckets(nc.jetstream(), Subjects(root))
        yield b.agents, b.models
    finally:
        await nc.close()


async def contents(kv: KeyValue) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    watcher = await kv.watchall(ignore_deletes=True)
    async for entry in watcher:
        if entry is None:
            break
        out[entry.key] = entry.value or b""
    await watcher.stop()  # type: ignore[no-untyped-call]
    return out


def encoded(index: dict[str, ModelEntry]) -> dict[str, bytes]:
    return {k: msgspec.json.encode(v) for k, v in index.items()}


FLEET = [
    agent("nvidia-0", "nvidia", ["llama3.2", "qwen3:8b"], ["llama3.2"]),
    agent("amd-1", "amd", ["llama3.2"], ["llama3.2"]),
]


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
async def test_the_writer_follows_the_agents_bucket(bucket: tuple[KeyValue, KeyValue]) -> None:
    agents, models = bucket
    enc = msgspec.json.Encoder()
    await agents.put("nvidia-0", enc.encode(FLEET[0]))
    w = ModelIndexWriter(agents, models)
    await w.start()
    watcher = await models.watch("model.>")
    seen: dict[str, bytes | None] = {}
    events = 0

    async def until(want: dict[str, bytes]) -> None:
        nonlocal events
        async with asyncio.timeout(10):
            if {k: v for k, v in seen.items() if v is not None} == want:
                return
            async for entry in watcher:
                if entry is not None:
                    events += 1
                    seen[entry.key] = None if entry.operation in ("DEL", "PURGE") else entry.value
                if {k: v for k, v in seen.items() if v is not None} == want:
                    return

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
