"""`corral.runtime.kvwatch` on a real JetStream KV bucket: a snapshot holds every live key, a
watch's marker comes once after it, and a snapshot's consumer does not outlive it for long."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator

import nats
import pytest
from corral.runtime import kvwatch
from corral.runtime.kvwatch import (
    LIVE_INACTIVE_S,
    SNAPSHOT_INACTIVE_S,
    latest_per_subject,
    operation,
    snapshot,
    watching,
)
from corral.runtime.natsserver import NatsServer
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def kv(nc: NATS, root: str) -> KeyValue:
    return await nc.jetstream().create_key_value(KeyValueConfig(bucket=root, history=3))


async def test_an_empty_bucket_snapshot_is_empty(kv: KeyValue) -> None:
    assert await snapshot(kv, timeout=5.0) == []


async def test_a_snapshot_holds_the_latest_value_of_each_live_key(kv: KeyValue) -> None:
    await kv.put("a.one", b"1")
    await kv.put("a.two", b"2")
    await kv.put("a.one", b"1b")
    await kv.put("b.three", b"3")
    await kv.put("a.gone", b"x")
    await kv.delete("a.gone")  # the stream's last message is a delete marker
    got = {e.key: e.value for e in await snapshot(kv, timeout=5.0)}
    assert got == {"a.one": b"1b", "a.two": b"2", "b.three": b"3"}
    assert {e.key for e in await snapshot(kv, "a.>", timeout=5.0)} == {"a.one", "a.two"}
    await kv.purge("b.three")
    assert {e.key for e in await snapshot(kv, "b.>", timeout=5.0)} == set()


async def test_a_snapshot_beside_a_writer_has_every_key_written_before_it(kv: KeyValue) -> None:
    """Writes going on while it is read: whatever was there when it began is in it."""
    for i in range(50):
        await kv.put(f"k{i}", b"v")
    stop = asyncio.Event()

    async def write() -> None:
        i = 0
        while not stop.is_set():
            await kv.put(f"w{i % 20}", str(i).encode())
            i += 1

    writer = asyncio.create_task(write())
    try:
        for _ in range(20):
            keys = {e.key for e in await snapshot(kv, timeout=5.0)}
            assert {f"k{i}" for i in range(50)} <= keys
    finally:
        stop.set()
        await writer


async def test_a_snapshot_beside_writers_rewriting_its_keys_has_every_key(nc: NATS, root: str) -> None:
    """In a bucket that keeps one revision, as the fleet's do, a key rewritten while a snapshot is
    read loses the message the consumer was about to send, and the server's counts drop with it:
    a snapshot that trusted them missed keys (a few reads in 200 here)."""
    kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=f"{root}one", history=1))
    keys = {f"k{i}" for i in range(30)}
    for key in keys:
        await kv.put(key, b"v")
    stop = asyncio.Event()

    async def write(step: int) -> None:
        i = 0
        while not stop.is_set():
            await kv.put(f"k{(i * step) % 30}", str(i).encode())
            i += 1

    writers = [asyncio.create_task(write(1)), asyncio.create_task(write(7))]
    try:
        for _ in range(200):
            assert {e.key for e in await snapshot(kv, timeout=5.0)} == keys
    finally:
        stop.set()
        await asyncio.gather(*writers)


async def test_latest_per_subject_keeps_markers_in_stream_order(nc: NATS, kv: KeyValue, root: str) -> None:
    """The raw reading under `snapshot`, for streams that are not read as a bucket: the latest
    message of each subject, delete markers included, oldest first; nothing for no subject."""
    await kv.put("a", b"1")
    await kv.put("b", b"2")
    await kv.delete("a")
    await kv.put("c", b"3")
    got = await latest_per_subject(nc.jetstream(), f"KV_{root}", f"$KV.{root}.>", timeout=5.0)
    assert [(m.subject.rsplit(".", 1)[1], operation(m.headers), m.data) for m in got] == [
        ("b", None, b"2"),
        ("a", "DEL", b""),
        ("c", None, b"3"),
    ]
    assert [m.seq for m in got] == sorted(m.seq for m in got)
    assert await latest_per_subject(nc.jetstream(), f"KV_{root}", f"$KV.{root}.none.>", timeout=5.0) == []


async def test_a_subject_fetched_alone_reads_as_the_consumer_brings_it(
    nc: NATS, kv: KeyValue, root: str
) -> None:
    """What `latest_per_subject` fetches alone (a key the consumer did not bring) is the same as
    what the consumer brings, its time a datetime too (`corral status` reads its age); a purged key
    is its purge marker, and a subject never written is None."""
    await kv.put("a", b"1")
    js = nc.jetstream()
    alone = await kvwatch._last(js, f"KV_{root}", f"$KV.{root}.a")
    (brought,) = await latest_per_subject(js, f"KV_{root}", f"$KV.{root}.>", timeout=5.0)
    assert alone is not None and (alone.subject, alone.data, alone.seq) == (
        brought.subject,
        b"1",
        brought.seq,
    )
    assert isinstance(alone.time, datetime.datetime) and isinstance(brought.time, datetime.datetime)
    assert abs((alone.time - brought.time).total_seconds()) < 0.001
    await kv.purge("a")
    purged = await kvwatch._last(js, f"KV_{root}", f"$KV.{root}.a")
    assert purged is not None and operation(purged.headers) == "PURGE"  # the marker: the caller skips it
    assert await kvwatch._last(js, f"KV_{root}", f"$KV.{root}.b") is None  # never written


async def test_a_watch_gives_the_snapshot_then_one_marker_then_every_change(kv: KeyValue) -> None:
    await kv.put("x", b"1")
    await kv.put("y", b"2")
    async with watching(kv) as w:
        first = [await w.updates(5.0), await w.updates(5.0)]
        assert sorted((e.key, e.value) for e in first if e is not None) == [("x", b"1"), ("y", b"2")]
        assert await w.updates(5.0) is None
        await kv.put("x", b"3")
        await kv.delete("y")
        changed = await w.updates(5.0)
        assert changed is not None and (changed.key, changed.value, changed.operation) == ("x", b"3", None)
        deleted = await w.updates(5.0)
        assert deleted is not None and (deleted.key, deleted.operation) == ("y", "DEL")
        with pytest.raises(nats.errors.TimeoutError):
            await w.updates(0.2)  # nothing more, and no second marker


async def test_a_watch_of_nothing_marks_its_end_at_once_then_follows(kv: KeyValue) -> None:
    async with watching(kv, "z.>") as w:
        assert await w.updates(5.0) is None
        await kv.put("z.1", b"a")
        entry = await w.updates(5.0)
        assert entry is not None and entry.key == "z.1"


async def test_a_stopped_watch_ends_its_iteration(kv: KeyValue) -> None:
    async with watching(kv) as w:
        await w.stop()
        await w.stop()  # twice is no error
        assert [e async for e in w] == []


async def test_a_snapshots_consumer_is_short_lived_and_a_live_watchs_is_not(
    nc: NATS, kv: KeyValue, root: str
) -> None:
    """A snapshot's consumer goes soon after its reader stops listening (so frequent listings do
    not pile consumers up on the stream); a live watch's waits out a client's absence."""
    stream, jsm = f"KV_{root}", nc.jsm()
    async with watching(kv, inactive_s=SNAPSHOT_INACTIVE_S):
        (info,) = await jsm.consumers_info(stream)
        assert info.config.inactive_threshold == SNAPSHOT_INACTIVE_S
    async with watching(kv):
        infos = await jsm.consumers_info(stream)
        assert LIVE_INACTIVE_S in {i.config.inactive_threshold for i in infos}
