"""A call's bound on unread reply bytes: past it the queue empties and its reader is told why, with a
status that does not say the client went away (it is still there)."""

from __future__ import annotations

import pytest
from corral.protocol.errors import ReplyOverflow
from corral.transport.reply import Call
from nats.aio.msg import Msg


def _msg(n: int) -> Msg:
    return Msg(_client=None, subject="r", data=b"x" * n)  # type: ignore[arg-type]


async def test_a_reply_past_its_bound_is_dropped_and_its_reader_told_why() -> None:
    call = Call("rid", max_bytes=10)
    assert call.put(_msg(6))
    assert call.take().data == b"x" * 6  # read: its bytes no longer count
    assert call.put(_msg(6))
    assert not call.put(_msg(6))  # 12 unread bytes: over the bound
    assert call.overflowed and not call.put(_msg(1))  # and stays so
    for _ in range(2):  # what was queued is gone; every read fails alike
        with pytest.raises(ReplyOverflow) as e:
            await call.next(1.0)
        assert e.value.status == 503 and "over 10 bytes" in str(e.value)


async def test_an_unbounded_call_holds_whatever_comes() -> None:
    call = Call("rid")
    for _ in range(100):
        assert call.put(_msg(1000))
    assert not call.overflowed and call.queue.qsize() == 100
