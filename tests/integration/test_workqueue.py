"""The fleet-wide queue on a real JetStream stream: a poison message is dropped once, not redelivered."""

from __future__ import annotations

import time

import pytest
from corral.protocol import headers as H
from corral.protocol.subjects import Subjects
from corral.runtime.nats import connect
from corral.runtime.natsserver import NatsServer
from corral.runtime.workqueue import Puller, QueueFull, QueueLimits, depths, enqueue, ensure_stream
from nats.js.errors import NotFoundError

pytestmark = pytest.mark.integration


async def test_a_queued_request_with_a_bad_deadline_is_dropped_and_the_next_served(
    nats_server: NatsServer, root: str
) -> None:
    subjects = Subjects(root)
    nc = await connect(nats_server.url, name="test")
    try:
        js = nc.jetstream()
        await ensure_stream(js, subjects)
        subject = subjects.queue("any", "llama3=2E2=3Alatest")
        future = str(int(time.time() * 1000) + 60_000)
        poison = []
        for rid, deadline in (("1", "not-a-number"), ("2", "١٢"), ("3", future)):
            hdrs = {H.REQUEST: rid, H.DEADLINE: deadline, H.REPLY: "r." + rid}
            ack = await js.publish(subject, b"{}", headers=hdrs)
            if rid != "3":
                poison.append(ack.seq)
        assert await depths(js, subjects) == {subject: 3}
        taken, _ = await Puller(nc, subjects).take_batch(subject, 3)
        assert [(m.headers or {})[H.REQUEST] for m in taken] == ["3"]
        # the poison messages were acknowledged (and so removed) before take_batch returned:
        # nothing is left to be redelivered to the next agent
        for seq in poison:
            with pytest.raises(NotFoundError):
                await js.get_msg(subjects.queue_stream, seq)
    finally:
        await nc.close()


async def test_the_queue_is_bounded_in_bytes_and_the_bound_follows_the_setting(
    nats_server: NatsServer, root: str
) -> None:
    subjects = Subjects(root)
    nc = await connect(nats_server.url, name="test")
    try:
        js = nc.jetstream()
        await ensure_stream(js, subjects, limits=QueueLimits(depth=100, max_bytes=4096))
        body = b"x" * 1000
        hdrs = {H.REQUEST: "1", H.REPLY: "r.1"}
        with pytest.raises(QueueFull):
            for i in range(10):  # ten 1 kB requests cannot all fit in 4 kB
                await enqueue(nc, js, subjects, "any", f"m{i % 2}", body, hdrs)
        assert 1 <= sum((await depths(js, subjects)).values()) < 5
        # a gateway with a larger setting raises the bound of the existing stream
        await ensure_stream(js, subjects, limits=QueueLimits(depth=100, max_bytes=64 * 1024))
        await enqueue(nc, js, subjects, "any", "m0", body, hdrs)
        info = await js.stream_info(subjects.queue_stream)
        assert (info.config.max_bytes, info.config.max_msgs_per_subject) == (64 * 1024, 100)
    finally:
        await nc.close()


async def test_a_pull_that_brought_only_dropped_requests_pulls_again(
    nats_server: NatsServer, root: str
) -> None:
    """Expired and poison requests ahead of a live one do not hide it: one take returns it."""
    subjects = Subjects(root)
    nc = await connect(nats_server.url, name="test")
    try:
        js = nc.jetstream()
        await ensure_stream(js, subjects)
        subject = subjects.queue("any", "m")
        past, future = str(int(time.time() * 1000) - 1000), str(int(time.time() * 1000) + 60_000)
        for rid, deadline in (("1", past), ("2", "x"), ("3", past), ("4", future)):
            await js.publish(subject, b"{}", headers={H.REQUEST: rid, H.DEADLINE: deadline, H.REPLY: "r"})
        taken, _ = await Puller(nc, subjects).take_batch(subject, 2)
        assert [(m.headers or {})[H.REQUEST] for m in taken] == ["4"]
    finally:
        await nc.close()
