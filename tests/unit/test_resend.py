"""A request sent again each time the service copy serving it stops, read as one reply
(`corral.transport.resend`), against scripted replies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from corral.protocol.errors import AgentUnavailable, ServiceStopping
from corral.transport.resend import Resent


class Scripted:
    """A reply whose body is ``batches``, ended by ``error`` when one is given."""

    def __init__(self, first: bytes, batches: list[bytes], error: Exception | None = None) -> None:
        self.agent, self.status, self.content_type = "registry", 200, "application/x-ndjson"
        self.first, self.ended = first, False
        self._batches, self._error = batches, error
        self.closed = False

    async def batches(self) -> AsyncIterator[bytes]:
        for b in self._batches:
            yield b
        if self._error is not None:
            raise self._error
        self.ended = True

    async def close(self) -> None:
        self.closed = True


def sender(*answers: Any) -> tuple[Any, list[int]]:
    """A send that answers each call with the next of ``answers`` (raised when an exception)."""
    calls = [0]

    async def send() -> Any:
        answer = answers[calls[0]]
        calls[0] += 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    return send, calls


async def read(resent: Resent) -> bytes:
    async with resent:
        return await resent.read()


async def test_a_stream_cut_by_a_stopping_copy_carries_on_with_the_next_copys_reply() -> None:
    # the stop cuts a line short; the next copy's head holds half a line, its body the rest
    stopping = Scripted(
        b'{"status":"pulling manifest"}\n{"sta',
        [b'tus":"x"}\n{"completed":1}\n{"compl'],
        ServiceStopping("stops"),
    )
    following = Scripted(b'{"status":"pull', [b'ing manifest"}\n{"completed":2}\n{"status":"success"}\n'])
    send, calls = sender(stopping, following)
    resent = Resent(send, "pull", 3)
    assert await resent.begin()
    assert resent.first == b'{"status":"pulling manifest"}\n'  # whole lines only, from the first too
    body = await read(resent)
    assert body.splitlines() == [
        b'{"status":"pulling manifest"}',
        b'{"status":"x"}',
        b'{"completed":1}',  # the line the stop cut short is dropped: no reader gets half a line
        b'{"status":"pulling manifest"}',
        b'{"completed":2}',
        b'{"status":"success"}',
    ]
    assert calls == [2] and resent.ended and following.closed  # leaving closes the reply open now


async def test_a_whole_body_and_a_last_line_without_its_newline_are_handed_on_whole() -> None:
    send, _ = sender(Scripted(b'{"status":"success"}', []))
    resent = Resent(send, "pull", 3)
    assert await resent.begin()
    assert await read(resent) == b'{"status":"success"}'
    ended = Scripted(b'{"error":"no"}', [])
    ended.ended = True  # a head that is the whole answer
    send, _ = sender(ended)
    resent = Resent(send, "pull", 3)
    assert await resent.begin() and resent.first == b'{"error":"no"}'


async def test_a_copy_stopping_before_its_head_is_passed_over() -> None:
    answer = Scripted(b'{"status":"success"}\n', [])
    send, calls = sender(ServiceStopping("stops"), ServiceStopping("stops too"), answer)
    resent = Resent(send, "pull", 3)
    assert await resent.begin()
    assert await read(resent) == b'{"status":"success"}\n' and calls == [3]


async def test_when_no_copy_is_left_the_stop_is_the_answer() -> None:
    # before the head: no copy runs (None), so the asker's "no registry" path takes over
    send, _ = sender(ServiceStopping("stops"), None)
    assert not await Resent(send, "pull", 3).begin()
    # after the head: the stream ends with the copy's own stop
    send, _ = sender(Scripted(b"{}\n", [], ServiceStopping("the registry is stopping")), None)
    resent = Resent(send, "pull", 3)
    assert await resent.begin()
    with pytest.raises(ServiceStopping, match="the registry is stopping"):
        await read(resent)


async def test_resends_are_bounded() -> None:
    send, calls = sender(*[Scripted(b"{}\n", [], ServiceStopping(f"stop {i}")) for i in range(5)])
    resent = Resent(send, "pull", 2)
    assert await resent.begin()
    with pytest.raises(ServiceStopping, match="stop 2"):
        await read(resent)
    assert calls == [3]  # the first send and two more


async def test_other_failures_are_not_resent() -> None:
    send, calls = sender(Scripted(b"{}\n", [], AgentUnavailable("agent 1 stopped responding")))
    resent = Resent(send, "pull", 3)
    assert await resent.begin()
    with pytest.raises(AgentUnavailable, match="stopped responding"):
        await read(resent)
    assert calls == [1]
