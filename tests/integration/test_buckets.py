"""The KV buckets are bounded in bytes, each as its `BucketSpec` says, against a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import nats.js.errors
import pytest
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import (
    BUCKETS,
    BucketSpec,
    ensure_buckets,
    ensure_buckets_at_start,
    kv_create,
    open_bucket,
)
from corral.runtime.natsserver import NatsServer
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ServiceUnavailableError,
)

SMALL = 64 * 1024


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


async def test_every_bucket_is_made_with_its_bounds(nc: NATS, root: str) -> None:
    subjects = Subjects(root)
    await ensure_buckets(nc.jetstream(), subjects)
    names = {
        "agents": subjects.agents_bucket,
        "models": subjects.models_bucket,
        "sessions": subjects.sessions_bucket,
        "views": subjects.views_bucket,
        "policy": subjects.policy_bucket,
    }
    assert set(names) == set(BUCKETS)
    for kind, name in names.items():
        cfg = (await nc.jetstream().stream_info(f"KV_{name}")).config
        spec = BUCKETS[kind]
        assert cfg.max_bytes == spec.max_bytes, kind
        assert cfg.storage == spec.storage, kind
        assert cfg.discard == (DiscardPolicy.OLD if spec.evict else DiscardPolicy.NEW), kind


async def test_a_bucket_made_without_bounds_is_given_them(nc: NATS, root: str) -> None:
    subjects = Subjects(root)
    js = nc.jetstream()
    await js.create_key_value(KeyValueConfig(bucket=subjects.views_bucket, storage=StorageType.MEMORY))
    assert (await js.stream_info(f"KV_{subjects.views_bucket}")).config.max_bytes in (None, -1)
    await ensure_buckets(js, subjects)
    assert (await js.stream_info(f"KV_{subjects.views_bucket}")).config.max_bytes == BUCKETS[
        "views"
    ].max_bytes


async def test_a_put_with_a_rollup_header_cannot_wipe_a_bucket(nc: NATS, root: str) -> None:
    """A bucket stream refuses rollups: whoever may write one key (an agent, its own state) would
    otherwise delete every other key with ``Nats-Rollup: all``. A bucket made before has them turned
    off by the operator's setup step (a service whose identity may not change streams would wait out
    a refused change at every start)."""
    subjects = Subjects(root)
    js = nc.jetstream()
    await js.create_key_value(KeyValueConfig(bucket=subjects.agents_bucket, storage=StorageType.MEMORY))
    assert (await js.stream_info(f"KV_{subjects.agents_bucket}")).config.allow_rollup_hdrs
    await ensure_buckets(js, subjects)  # a service: it makes the others so, and leaves this one
    assert not (await js.stream_info(f"KV_{subjects.views_bucket}")).config.allow_rollup_hdrs
    assert (await js.stream_info(f"KV_{subjects.agents_bucket}")).config.allow_rollup_hdrs
    agents = (await ensure_buckets(js, subjects, setup=True)).agents  # the operator's setup step
    await agents.put("other", b"kept")
    with pytest.raises(nats.js.errors.APIError, match="rollup not permitted"):
        await js.publish(
            subjects.kv_key(subjects.agents_bucket, "mine"), b"x", headers={"Nats-Rollup": "all"}
        )
    assert (await agents.get("other")).value == b"kept"


async def test_a_full_cache_forgets_its_oldest_entries_and_a_full_bucket_refuses(nc: NATS, root: str) -> None:
    specs = {
        "sessions": BucketSpec(StorageType.MEMORY, SMALL, ttl=3600.0, evict=True),
        "agents": BucketSpec(StorageType.MEMORY, SMALL),
    }
    buckets = await ensure_buckets(nc.jetstream(), Subjects(root), specs=specs)
    value = b"x" * 512
    for i in range(4 * SMALL // len(value)):  # four times what fits: every put is taken
        await buckets.sessions.put(f"s{i}", value)
    with pytest.raises(KeyNotFoundError):
        await buckets.sessions.get("s0")
    assert (await buckets.sessions.get(f"s{i}")).value == value

    taken = 0
    with pytest.raises(nats.errors.Error):
        for i in range(4 * SMALL // len(value)):
            await buckets.agents.put(f"a{i}", value)
            taken += 1
    assert 0 < taken < SMALL // len(value)  # it took what fits, then refused


async def test_a_bucket_made_by_another_service_meanwhile_is_opened(nc: NATS, root: str) -> None:
    """Two services open the sessions bucket at once: the other one creates it (and gives it its
    discard policy) between this one's lookup and its create, which the server refuses as a stream
    of another configuration. This one opens theirs instead of failing."""
    subjects = Subjects(root)
    js = nc.jetstream()
    await ensure_buckets(js, subjects)  # "the other service"
    lookup = js.key_value
    missed = False

    async def late_lookup(bucket: str) -> object:
        nonlocal missed
        if bucket == subjects.sessions_bucket and not missed:
            missed = True  # this service looked before the other one created it
            raise BucketNotFoundError()
        return await lookup(bucket)

    js.key_value = late_lookup  # type: ignore[method-assign]
    kv = await open_bucket(js, subjects.sessions_bucket, BUCKETS["sessions"])
    assert missed and kv._name == subjects.sessions_bucket


async def test_a_stream_not_found_just_after_it_was_made_is_asked_for_again(nc: NATS, root: str) -> None:
    """On a cluster that has just formed, a meta leader elected between a bucket's create and the
    next question answers "stream not found" until it has applied the create. A starting service
    asks again, rather than exiting."""
    subjects = Subjects(root)
    js = nc.jetstream()
    info = js.stream_info
    asked = missed = 0

    async def behind(name: str, *args: object, **kwargs: object) -> object:
        nonlocal asked, missed
        if name == f"KV_{subjects.sessions_bucket}":
            asked += 1
            if asked == 2:  # the first question after the create (the first is the lookup)
                missed += 1
                raise NotFoundError(code=404, err_code=10059, description="stream not found")
        return await info(name, *args, **kwargs)  # type: ignore[arg-type]

    js.stream_info = behind  # type: ignore[method-assign]
    async with asyncio.timeout(10):  # its patience for a forming cluster is a minute
        buckets = await ensure_buckets_at_start(js, subjects)
    assert missed == 1
    await buckets.sessions.put("s", b"kept")
    assert (await buckets.sessions.get("s")).value == b"kept"
    assert (await info(f"KV_{subjects.sessions_bucket}")).config.max_bytes == BUCKETS["sessions"].max_bytes


async def test_a_service_starting_against_a_server_without_jetstream_fails_at_once(root: str) -> None:
    """JetStream that is not there at all ("no responders") is a misconfiguration, raised at once,
    not a cluster still forming that a starting service waits for."""
    async with NatsServer(jetstream=False) as server:
        nc = await nats.connect(server.url)
        try:
            async with asyncio.timeout(10):  # its patience for a forming cluster is a minute
                with pytest.raises(ServiceUnavailableError):
                    await ensure_buckets_at_start(nc.jetstream(), Subjects(root))
        finally:
            await nc.close()


async def test_a_create_a_stale_replica_answers_not_found_for_is_a_key_that_exists(
    nc: NATS, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py's create, refused for a key that exists, reads the key back; on a cluster that read
    may come from a replica that has not seen the key yet. `kv_create` reads that as what it is."""
    kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=f"{root}_stale"))
    assert await kv_create(kv, "k", b"1") == 1
    with pytest.raises(KeyWrongLastSequenceError):
        await kv_create(kv, "k", b"2")

    async def not_seen_yet(key: str, *args: object, **kwargs: object) -> None:
        raise KeyNotFoundError

    monkeypatch.setattr(kv, "_get", not_seen_yet)  # the read-back, as a lagging replica answers it
    with pytest.raises(KeyNotFoundError):
        await kv.create("k", b"2")
    with pytest.raises(KeyWrongLastSequenceError):
        await kv_create(kv, "k", b"2")
