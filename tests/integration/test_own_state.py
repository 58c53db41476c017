"""`OwnState`: an agent's state written under its id only while the key is its own, against a real
JetStream KV bucket: what another process, the registry or NATS itself may do to the key."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from corral.protocol.messages import AgentState, agent_state_encoder, agent_state_of
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import ensure_buckets
from corral.runtime.fleet import OwnState
from corral.runtime.natsserver import NatsServer
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

pytestmark = pytest.mark.integration

AGENT = "box-11434"


def state(started_at: float, host: str = "box") -> bytes:
    value = {"id": AGENT, "vendor": "nvidia", "host": host, "ollama_url": "http://127.0.0.1:11434"}
    return agent_state_encoder.encode(msgspec.convert(value | {"started_at": started_at}, AgentState))


@pytest.fixture
async def agents(nats_server: NatsServer, root: str) -> AsyncIterator[KeyValue]:
    nc = await nats.connect(nats_server.url)
    try:
        yield (await ensure_buckets(nc.jetstream(), Subjects(root))).agents
    finally:
        await nc.close()


class Told:
    def __init__(self) -> None:
        self.why: list[str] = []

    def __call__(self, why: str) -> None:
        self.why.append(why)


class Reads:
    """The bucket, counting the reads made of it (`get`)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv, self.reads = kv, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.kv, name)

    async def get(self, key: str) -> object:
        self.reads += 1
        return await self.kv.get(key)


async def stored(agents: KeyValue) -> float:
    return agent_state_of(AGENT, (await agents.get(AGENT)).value or b"").started_at


async def test_its_own_writes_a_deletion_and_a_lost_answer_never_displace_it(agents: KeyValue) -> None:
    told = Told()
    own = OwnState(agents, AGENT, 1000.0, told)
    await own.put(state(1000.0))
    await own.put(state(1000.0))  # compare-and-set on its first write
    await agents.delete(AGENT)  # the registry took it for dead
    await own.put(state(1000.0))
    await agents.put(AGENT, state(1000.0))  # a write of its own whose answer was lost
    await own.put(state(1000.0))
    await own.put(state(1000.0))  # and compare-and-set again from there
    assert told.why == [] and not own.displaced and await stored(agents) == 1000.0
    await own.delete()  # its own, though its last write's answer was lost once
    with pytest.raises(KeyNotFoundError):
        await agents.get(AGENT)


async def test_a_process_that_started_earlier_keeps_the_id(agents: KeyValue) -> None:
    told = Told()
    own = OwnState(agents, AGENT, 1030.0, told)
    await own.put(state(1030.0))
    await agents.put(AGENT, state(1000.0, host="clone"))  # the first holder's heartbeat
    await own.put(state(1030.0))
    assert own.displaced and len(told.why) == 1 and "on clone" in told.why[0] and "30s before" in told.why[0]
    await own.put(state(1030.0))  # nothing more is written ...
    await own.delete()  # ... nor deleted
    assert await stored(agents) == 1000.0 and len(told.why) == 1


async def test_a_process_that_started_later_gives_way_itself(agents: KeyValue) -> None:
    told = Told()
    own = OwnState(agents, AGENT, 1000.0, told)
    await own.put(state(1000.0))
    await agents.put(AGENT, state(1030.0, host="clone"))  # the duplicate's write
    await own.put(state(1000.0))  # written over: the duplicate finds it at its next write
    assert not own.displaced and told.why == [] and await stored(agents) == 1000.0


async def test_a_stop_before_any_write_deletes_only_its_own(agents: KeyValue) -> None:
    await agents.put(AGENT, state(1000.0, host="other"))
    await OwnState(agents, AGENT, 1030.0, Told()).delete()
    assert await stored(agents) == 1000.0
    await agents.put(AGENT, state(1030.0))  # its first write went through, its answer did not
    await OwnState(agents, AGENT, 1030.0, Told()).delete()
    with pytest.raises(KeyNotFoundError):
        await agents.get(AGENT)


async def test_a_bucket_made_again_starts_its_revisions_again(nats_server: NatsServer, root: str) -> None:
    """A restarted NATS that kept the bucket in memory makes it anew: revisions start at 1 again,
    and the writes go back to compare-and-set on the new ones."""
    nc = await nats.connect(nats_server.url)
    try:
        js, subjects = nc.jetstream(), Subjects(root)
        agents = Reads((await ensure_buckets(js, subjects)).agents)
        own = OwnState(agents, AGENT, 1000.0, Told())  # type: ignore[arg-type]
        for _ in range(5):
            await own.put(state(1000.0))
        await js.delete_key_value(subjects.agents_bucket)
        await ensure_buckets(js, subjects)
        await own.put(state(1000.0))  # its compare-and-set fails once: read, then written over
        assert agents.reads == 1 and (await agents.kv.get(AGENT)).revision == 1
        for _ in range(3):
            await own.put(state(1000.0))  # compare-and-set on the new revisions, no read between
        assert agents.reads == 1 and (await agents.kv.get(AGENT)).revision == 4 and not own.displaced
    finally:
        await nc.close()
