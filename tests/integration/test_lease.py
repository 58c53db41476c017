"""The registry copies' lease on a real JetStream KV bucket: one copy holds it, renews it without a
read each time, the others stop asking for a third of a term once they saw it held, and take it
over once it lapses. Each copy runs on a clock the test moves."""

from __future__ import annotations

from typing import Any

import pytest
from corral.protocol.subjects import Subjects
from corral.registry.lease import Lease, held
from corral.runtime.nats import connect
from corral.runtime.natsserver import NatsServer
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

pytestmark = pytest.mark.integration

TERM = 9.0


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


class CountingKV:
    """The bucket, counting the reads of the lease."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.reads = 0

    async def get(self, key: str) -> Any:
        self.reads += 1
        return await self.kv.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kv, name)


async def test_one_copy_holds_the_lease_and_another_takes_it_over_once_it_lapses(
    nats_server: NatsServer, root: str
) -> None:
    nc = await connect(nats_server.url, name="test")
    try:
        js = nc.jetstream()
        bucket = await js.create_key_value(
            KeyValueConfig(bucket=Subjects(root).views_bucket, storage=StorageType.MEMORY)
        )
        clock = Clock()
        kv_a, kv_b = CountingKV(bucket), CountingKV(bucket)
        a = Lease(kv_a, "pins.keeper", TERM, now=clock)  # type: ignore[arg-type]
        b = Lease(kv_b, "pins.keeper", TERM, now=clock)  # type: ignore[arg-type]

        assert await a.held()  # the first to ask takes it
        assert not await b.held()
        reads = kv_b.reads
        for _ in range(100):  # a busy fleet asks on every change: the standby reads nothing more
            assert not await b.held()
            assert await a.held()  # nor does the holder, within a third of its term
        assert kv_b.reads == reads and kv_a.reads == 1

        clock.t += TERM / 3  # due: the holder renews, the standby reads again and sees it renewed
        assert await a.held()
        assert not await b.held()
        assert kv_b.reads == reads + 1

        clock.t += TERM  # the holder stopped renewing (it died): the lease lapses
        assert await b.held()
        assert not await a.held()  # the old holder finds it taken and stands by
        clock.t += TERM / 3
        assert await b.held()  # the new holder renews
    finally:
        await nc.close()


async def test_a_lease_value_reads_as_held_within_its_term_only(nats_server: NatsServer, root: str) -> None:
    """`held`, what `corral pin` reads to tell whether a registry keeps the pins."""
    nc = await connect(nats_server.url, name="test")
    try:
        kv = await nc.jetstream().create_key_value(
            KeyValueConfig(bucket=Subjects(root).views_bucket, storage=StorageType.MEMORY)
        )
        assert await Lease(kv, "k", TERM, now=lambda: 1_000.0).held()
        value = (await kv.get("k")).value
        assert held(value, TERM, now=lambda: 1_008.0) and not held(value, TERM, now=lambda: 1_009.0)
        assert not held(None, TERM) and not held(b"not json", TERM)
    finally:
        await nc.close()
