"""Withdrawing a queued request on a real JetStream work queue: a request an agent already took, or
that another withdrawal removed first, is reported as taken and logged at debug (what many
cancellations at once produce), not as a failure."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from corral.protocol import headers as H
from corral.protocol.subjects import Subjects
from corral.runtime.nats import connect
from corral.runtime.natsserver import NatsServer
from corral.runtime.workqueue import enqueue, ensure_stream, withdraw

pytestmark = pytest.mark.integration

TOKEN = "llama3=2E2=3Alatest"


async def test_withdrawing_what_was_taken_or_withdrawn_already_is_no_warning(
    nats_server: NatsServer, root: str, caplog: pytest.LogCaptureFixture
) -> None:
    subjects = Subjects(root)
    nc = await connect(nats_server.url, name="test")
    try:
        js = nc.jetstream()
        await ensure_stream(js, subjects)
        deadline = str(int(time.time() * 1000) + 60_000)

        async def queue(rid: str):  # type: ignore[no-untyped-def]
            hdrs = {H.REQUEST: rid, H.DEADLINE: deadline, H.REPLY: "r." + rid}
            return await enqueue(nc, js, subjects, "any", TOKEN, b"{}", hdrs)

        taken = await queue("taken")
        raced = await queue("raced")
        caplog.set_level(logging.DEBUG, logger="corral.runtime.workqueue")
        agent = await js.pull_subscribe(subjects.queue("any", TOKEN), durable="agent")
        msgs = await agent.fetch(1, timeout=5)
        assert [(m.headers or {})[H.REQUEST] for m in msgs] == ["taken"]
        await msgs[0].ack_sync()  # an agent took it: confirmed gone from the work queue

        assert await withdraw(js, taken) is False
        # a burst of cancellations withdrawing the same request: one removes it, the rest find it gone
        results = await asyncio.gather(*(withdraw(js, raced) for _ in range(10)))
        assert sorted(results) == [False] * 9 + [True]
    finally:
        await nc.close()
    ours = [r for r in caplog.records if r.name == "corral.runtime.workqueue"]
    assert not [r for r in ours if r.levelno >= logging.WARNING], [r.getMessage() for r in ours]
    gone = [r for r in ours if r.levelno == logging.DEBUG and "taken before its withdrawal" in r.getMessage()]
    assert len(gone) == 10
