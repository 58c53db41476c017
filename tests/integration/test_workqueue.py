"""The fleet-wide queue on a real JetStream stream: a poison message is dropped once, not redelivered;
the queue is bounded; withdrawing a request an agent already took, or that another withdrawal
removed first, is reported as taken and logged at debug (what many cancellations at once produce),
not as a failure."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from corral.gateway.settings import GatewaySettings
from corral.protocol import headers as H
from corral.protocol.subjects import Subjects
from corral.runtime.nats import connect, round_trip
from corral.runtime.natsserver import NatsServer
from corral.runtime.workqueue import (
    MAX_AGE_S,
    Puller,
    QueueFull,
    QueueLimits,
    Reader,
    depths,
    enqueue,
    ensure_stream,
    keep_long_enough,
    reader_position,
    still_queued,
    withdraw,
)
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.integration import waits

pytestmark = pytest.mark.integration

Queue = tuple[Subjects, NATS, JetStreamContext]
TOKEN = "llama3=2E2=3Alatest"


@pytest.fixture
async def queue(nats_server: NatsServer, root: str) -> AsyncIterator[Queue]:
    """A connection to a real NATS with JetStream, under the test's own subject root."""
    nc = await connect(nats_server.url, name="test")
    try:
        yield Subjects(root), nc, nc.jetstream()
    finally:
        await nc.close()


async def test_a_queued_request_with_a_bad_deadline_is_dropped_and_the_next_served(queue: Queue) -> None:
    subjects, nc, js = queue
    await ensure_stream(js, subjects)
    subject = subjects.queue("any", "llama3=2E2=3Alatest")
    future = str(int(time.time() * 1000) + 60_000)
    poison = []
    for rid, deadline in (("1", "not-a-number"), ("2", "١٢"), ("3", future)):
        hdrs = {H.REQUEST: rid, H.DEADLINE: deadline, H.REPLY: "r." + rid}
        ack = await js.publish(subject, b"{}", headers=hdrs)
        if rid != "3":
            poison.append(ack.seq)
    assert await depths(nc, subjects) == {subject: 3}
    taken, _ = await Puller(nc, subjects).take_batch(subject, 3)
    assert [(m.headers or {})[H.REQUEST] for m in taken] == ["3"]
    # the poison messages were acknowledged (and so removed) before take_batch returned:
    # nothing is left to be redelivered to the next agent
    for seq in poison:
        with pytest.raises(NotFoundError):
            await js.get_msg(subjects.queue_stream, seq)


async def test_a_gateway_sets_the_fleets_queue_limits_when_it_starts_not_when_it_reconnects(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    """The queue is one for the fleet: a gateway started with other limits changes them for every
    gateway, and says so; its ensure after a reconnect does not, so gateways set differently do
    not take turns at each NATS restart."""
    subjects, _, js = queue
    await ensure_stream(js, subjects, limits=QueueLimits(depth=512, max_bytes=1 << 20))
    with caplog.at_level(logging.WARNING, logger="corral.runtime.workqueue"):
        await ensure_stream(js, subjects, limits=QueueLimits(depth=3, max_bytes=1 << 20), change=False)
        cfg = (await js.stream_info(subjects.queue_stream)).config
        assert cfg.max_msgs_per_subject == 512 and not caplog.records
        await ensure_stream(js, subjects, limits=QueueLimits(depth=3, max_bytes=1 << 20))
    cfg = (await js.stream_info(subjects.queue_stream)).config
    assert cfg.max_msgs_per_subject == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"the fleet queue's limits change from 512 requests per model and {1 << 20} bytes to 3 and "
        f"{1 << 20} (this gateway's settings), for every gateway"
    ]


async def test_the_queue_is_bounded_in_bytes_and_the_bound_follows_the_setting(queue: Queue) -> None:
    subjects, nc, js = queue
    await ensure_stream(js, subjects, limits=QueueLimits(depth=100, max_bytes=4096))
    body = b"x" * 1000
    hdrs = {H.REQUEST: "1", H.REPLY: "r.1"}
    with pytest.raises(QueueFull):
        for i in range(10):  # ten 1 kB requests cannot all fit in 4 kB
            await enqueue(nc, js, subjects, "any", f"m{i % 2}", body, hdrs)
    assert 1 <= sum((await depths(nc, subjects)).values()) < 5
    # a gateway with a larger setting raises the bound of the existing stream
    await ensure_stream(js, subjects, limits=QueueLimits(depth=100, max_bytes=64 * 1024))
    await enqueue(nc, js, subjects, "any", "m0", body, hdrs)
    info = await js.stream_info(subjects.queue_stream)
    assert (info.config.max_bytes, info.config.max_msgs_per_subject) == (64 * 1024, 100)


async def test_a_queue_made_by_an_older_version_keeps_requests_for_the_longest_deadline(queue: Queue) -> None:
    """A stream made when requests aged out after ten minutes outlives a deadline of an hour, once a
    gateway has set its limits."""
    subjects, _, js = queue
    await ensure_stream(js, subjects)
    info = await js.stream_info(subjects.queue_stream)
    await js.update_stream(replace(info.config, max_age=600.0))
    await ensure_stream(js, subjects, limits=QueueLimits())
    assert (await js.stream_info(subjects.queue_stream)).config.max_age == MAX_AGE_S
    assert GatewaySettings().queue_timeout_s <= MAX_AGE_S
    # with NATS identities only the operator's setup step may change it, and changes only the age
    await js.update_stream(replace(info.config, max_age=600.0, max_msgs_per_subject=7))
    assert await keep_long_enough(js, subjects)
    cfg = (await js.stream_info(subjects.queue_stream)).config
    assert (cfg.max_age, cfg.max_msgs_per_subject) == (MAX_AGE_S, 7)
    assert not await keep_long_enough(js, subjects)
    # an operator's longer limit is kept, by the setup step and by a gateway's start alike
    await js.update_stream(replace(cfg, max_age=2 * MAX_AGE_S))
    assert not await keep_long_enough(js, subjects)
    await ensure_stream(js, subjects, limits=QueueLimits())
    assert (await js.stream_info(subjects.queue_stream)).config.max_age == 2 * MAX_AGE_S


async def test_a_pull_that_brought_only_dropped_requests_pulls_again(queue: Queue) -> None:
    """Expired and poison requests ahead of a live one do not hide it: one take returns it."""
    subjects, nc, js = queue
    await ensure_stream(js, subjects)
    subject = subjects.queue("any", "m")
    past, future = str(int(time.time() * 1000) - 1000), str(int(time.time() * 1000) + 60_000)
    for rid, deadline in (("1", past), ("2", "x"), ("3", past), ("4", future)):
        await js.publish(subject, b"{}", headers={H.REQUEST: rid, H.DEADLINE: deadline, H.REPLY: "r"})
    taken, _ = await Puller(nc, subjects).take_batch(subject, 2)
    assert [(m.headers or {})[H.REQUEST] for m in taken] == ["4"]


async def test_a_consumer_gone_under_an_agent_is_made_again(queue: Queue) -> None:
    """The queue stream made again under a running agent (a NATS that lost its state, an operator
    switching to a cluster): its consumers are gone. The agent's next take makes its consumer again
    and takes; it used to ask the gone consumer for ever (nobody answers) while requests waited."""
    subjects, nc, js = queue
    await ensure_stream(js, subjects)
    subject = subjects.queue("any", "m")
    puller = Puller(nc, subjects)
    assert await puller.take_batch(subject, 1) == ([], True)  # its consumer exists now
    await js.delete_stream(subjects.queue_stream)
    await ensure_stream(js, subjects)
    future = str(int(time.time() * 1000) + 60_000)
    await js.publish(subject, b"{}", headers={H.REQUEST: "1", H.DEADLINE: future, H.REPLY: "r"})
    taken, _ = await puller.take_batch(subject, 1)
    assert [(m.headers or {})[H.REQUEST] for m in taken] == ["1"]


async def test_withdrawing_what_was_taken_or_withdrawn_already_is_no_warning(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    subjects, nc, js = queue
    await ensure_stream(js, subjects)
    deadline = str(int(time.time() * 1000) + 60_000)

    async def put(rid: str):  # type: ignore[no-untyped-def]
        hdrs = {H.REQUEST: rid, H.DEADLINE: deadline, H.REPLY: "r." + rid}
        return await enqueue(nc, js, subjects, "any", TOKEN, b"{}", hdrs)

    taken = await put("taken")
    raced = await put("raced")
    caplog.set_level(logging.DEBUG, logger="corral.runtime.workqueue")
    agent = await js.pull_subscribe(subjects.queue("any", TOKEN), durable="agent")
    msgs = await agent.fetch(1, timeout=5)
    assert [(m.headers or {})[H.REQUEST] for m in msgs] == ["taken"]
    await msgs[0].ack_sync()  # an agent took it: confirmed gone from the work queue

    assert await withdraw(js, taken) is False
    # a burst of cancellations withdrawing the same request: one removes it, the rest find it gone
    results = await asyncio.gather(*(withdraw(js, raced) for _ in range(10)))
    assert sorted(results) == [False] * 9 + [True]
    ours = [r for r in caplog.records if r.name == "corral.runtime.workqueue"]
    assert not [r for r in ours if r.levelno >= logging.WARNING], [r.getMessage() for r in ours]
    gone = [r for r in ours if r.levelno == logging.DEBUG and "taken before its withdrawal" in r.getMessage()]
    assert len(gone) == 10


async def test_still_queued_until_an_agent_takes_it(queue: Queue, caplog: pytest.LogCaptureFixture) -> None:
    subjects, nc, js = queue
    await ensure_stream(js, subjects)
    deadline = str(int(time.time() * 1000) + 60_000)
    hdrs = {H.REQUEST: "q", H.DEADLINE: deadline, H.REPLY: "r.q"}
    queued = await enqueue(nc, js, subjects, "any", TOKEN, b"{}", hdrs)
    assert await still_queued(js, queued) is True
    caplog.set_level(logging.WARNING, logger="corral.runtime.workqueue")
    assert len(await Puller(nc, subjects).take(subjects.queue("any", TOKEN), 1)) == 1

    async def taken() -> bool:
        return await still_queued(js, queued) is False

    # the take's ack is on its way: the stream drops the request once the server has handled it
    await waits.until(taken, lambda t: round_trip(nc, max(t, 0.01)), timeout=5.0)
    assert not caplog.records  # taken is an answer, not a warning


async def test_the_queue_readers_position_before_and_after_an_agent_makes_it_and_takes(queue: Queue) -> None:
    subjects, nc, js = queue
    await ensure_stream(js, subjects)
    subject = subjects.queue("any", TOKEN)
    none_yet = await reader_position(js, subjects, subject, timeout=2.0)
    assert none_yet == Reader(0, None)  # JetStream says there is none
    assert await Puller(nc, subjects).take(subject, 1) == []  # an agent's first take makes it
    assert await reader_position(js, subjects, subject, timeout=2.0) == Reader(0, 0)
    future = str(int(time.time() * 1000) + 60_000)
    ack = await js.publish(subject, b"{}", headers={H.REQUEST: "1", H.DEADLINE: future, H.REPLY: "r"})
    waiting = await reader_position(js, subjects, subject, timeout=2.0)
    assert waiting == Reader(0, 1) and waiting is not None and not waiting.passed(ack.seq)
    assert len(await Puller(nc, subjects).take(subject, 1)) == 1
    assert await reader_position(js, subjects, subject, timeout=2.0) == Reader(ack.seq, 0)  # handed out


async def test_a_queue_reader_jetstream_cannot_answer_for_is_unreadable(
    root: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without JetStream nobody answers its API (as in a cluster electing a leader): unreadable."""
    async with NatsServer(jetstream=False) as server:
        nc = await connect(server.url, name="test")
        try:
            subjects = Subjects(root)
            caplog.set_level(logging.WARNING, logger="corral.runtime.workqueue")
            assert (
                await reader_position(nc.jetstream(), subjects, subjects.queue("any", TOKEN), timeout=2.0)
                is None
            )
            assert "does not answer" in caplog.text
        finally:
            await nc.close()


async def test_a_request_the_reader_skipped_while_its_position_was_read_counts_as_passed(
    queue: Queue, nats_server: NatsServer
) -> None:
    """nats-server can move a work-queue consumer past a request stored while a consumer-info
    request races the deletion of the requests before it (what a gateway's rechecks, or a KEDA
    scaler, ask while queued requests are withdrawn): the request stays in the stream and no take
    ever gets it. Its reader then counts nothing left to hand out, which `Reader.passed` reads as
    passed, so a waiting gateway routes it again. Raced here until it happens, a bounded number of
    times; a nats-server that never skips leaves nothing to check."""
    subjects, nc, js = queue
    await ensure_stream(js, subjects)
    subject = subjects.queue("any", TOKEN)
    puller = Puller(nc, subjects)
    assert await puller.take(subject, 1) == []  # the reader exists
    future = str(int(time.time() * 1000) + 60_000)
    hdrs = {H.DEADLINE: future, H.REPLY: "r"}
    asker = await connect(nats_server.url, name="asker")
    stop = asyncio.Event()

    async def ask() -> None:  # the reader's position, asked again and again
        while not stop.is_set():
            await reader_position(asker.jetstream(), subjects, subject, timeout=2.0)

    asking = asyncio.create_task(ask())
    skipped = None
    try:
        for i in range(50):
            before = await enqueue(nc, js, subjects, "any", TOKEN, b"{}", hdrs | {H.REQUEST: f"w{i}"})
            await withdraw(js, before)
            queued = await enqueue(nc, js, subjects, "any", TOKEN, b"{}", hdrs | {H.REQUEST: f"q{i}"})
            got, drained = await puller.take_batch(subject, 1)
            if not got and drained:  # the queue answered "no messages" with the request in it
                skipped = queued
                break
    finally:
        stop.set()
        await asking
        await asker.close()
    if skipped is None:
        pytest.skip("this nats-server handed out every request: no skip to check")
    assert await puller.take_batch(subject, 1) == ([], True)  # for good: no take gets it
    assert await still_queued(js, skipped) is True
    reader = await reader_position(js, subjects, subject, timeout=2.0)
    assert reader is not None and reader.delivered < skipped.seq and reader.passed(skipped.seq), reader
