"""The chunk exchange of large bodies over a real nats-server (`corral.transport.bodies`): "not yet"
answers, a retried chunk, a passed offset, and a slow streamed body beside a whole one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from corral.protocol import headers as H
from corral.protocol.errors import BadRequest
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import NatsServer
from corral.transport.bodies import BodyGone, LargeBodies, fetch_body
from nats.aio.client import Client as NATS

pytestmark = pytest.mark.integration


class Source:
    """A body arriving piece by piece: each `read` takes the next scripted answer, after ``gate``."""

    def __init__(self, answers: list[bytes | BodyGone]) -> None:
        self.answers = answers
        self.size = sum(len(a) for a in answers if isinstance(a, bytes))
        self.held = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.reads = 0

    async def read(self, limit: int, wait: float) -> bytes:
        await self.gate.wait()
        self.reads += 1
        answer = self.answers.pop(0)
        if isinstance(answer, BodyGone):
            raise answer
        assert len(answer) <= limit
        return answer


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


@pytest.fixture
async def bodies(nc: NATS, root: str) -> AsyncIterator[tuple[LargeBodies, Subjects]]:
    subjects = Subjects(root)
    b = LargeBodies(nc, len(subjects.body("me", "x")) - 1)
    sub = await nc.subscribe(subjects.body_all("me"), cb=b.serve)
    yield b, subjects
    await sub.unsubscribe()
    await b.close()


async def test_not_yet_answers_are_asked_again_and_the_chunks_come_in_order(
    nc: NATS, bodies: tuple[LargeBodies, Subjects]
) -> None:
    b, subjects = bodies
    src = Source([b"", b"abc", b"", b"", b"defg"])
    b.keep("1", src)
    got = [c async for c in fetch_body(nc, subjects.body("me", "1"), src.size)]
    assert got == [b"abc", b"defg"]
    assert src.reads == 5
    b.drop("1")
    assert b.streams == 0


async def test_the_last_chunk_again_is_served_and_a_passed_offset_is_refused(
    nc: NATS, bodies: tuple[LargeBodies, Subjects]
) -> None:
    b, subjects = bodies
    src = Source([b"abc", b"def", b"ghi"])
    b.keep("2", src)
    subject = subjects.body("me", "2")
    assert (await nc.request(subject, b"0", timeout=5)).data == b"abc"
    assert (await nc.request(subject, b"0", timeout=5)).data == b"abc"  # a retry: not read again
    assert (await nc.request(subject, b"3", timeout=5)).data == b"def"
    assert b.held == 3  # the last chunk, kept for a retry, and nothing else
    passed = await nc.request(subject, b"0", timeout=5)
    assert passed.data == b"" and "offset 0" in (passed.headers or {})[H.ERROR]
    assert src.reads == 2


async def test_a_failed_source_fails_the_receiver_with_its_reason(
    nc: NATS, bodies: tuple[LargeBodies, Subjects]
) -> None:
    b, subjects = bodies
    src = Source([b"abc", BodyGone("the client went away"), b"def"])
    b.keep("3", src)
    with pytest.raises(BadRequest, match="the client went away"):
        async for _ in fetch_body(nc, subjects.body("me", "3"), src.size):
            pass
    unknown = await nc.request(subjects.body("me", "nope"), b"0", timeout=5)
    assert unknown.headers and H.ERROR in unknown.headers  # an answer at once, not a timeout


async def test_a_slow_streamed_body_does_not_hold_up_a_whole_one(
    nc: NATS, bodies: tuple[LargeBodies, Subjects]
) -> None:
    b, subjects = bodies
    slow = Source([b"abc"])
    slow.gate.clear()  # its client sends nothing yet
    b.keep("4", slow)
    b.keep("5", b"whole body")
    waiting = asyncio.create_task(nc.request(subjects.body("me", "4"), b"0", timeout=5))
    assert (await nc.request(subjects.body("me", "5"), b"6", timeout=5)).data == b"body"
    assert not waiting.done()
    slow.gate.set()
    assert (await waiting).data == b"abc"
