"""`_Rechecks`: JetStream asked whether a queue's reader answers, once per subject for every request
waiting there, and its latest answer read by all of them, also while the next question is out."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import corral.gateway.queueing as queueing
import pytest
from corral.protocol.subjects import Subjects
from corral.runtime.workqueue import Reader

SUBJECT = "t.queue.any.m"
RECHECK_S = 1.0


async def test_every_waiting_request_reads_the_latest_answer_while_the_next_is_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: asyncio.Queue[asyncio.Future[Reader | None]] = asyncio.Queue()  # each question, as it goes out

    async def reader_position(
        *_: Any, **__: Any
    ) -> Reader | None:  # JetStream's answer, when the test gives it
        answer = asyncio.get_running_loop().create_future()
        asked.put_nowait(answer)
        return await answer

    monkeypatch.setattr(queueing, "reader_position", reader_position)
    transport = SimpleNamespace(
        nc=SimpleNamespace(jetstream=lambda: None), subjects=Subjects("t"), claim_timeout=2.0
    )
    rechecks = queueing._Rechecks(transport, RECHECK_S)  # type: ignore[arg-type]

    async def answer(value: Reader | None) -> None:
        """The question out gets ``value``, and its answer is kept (its task has ended)."""
        (await asked.get()).set_result(value)
        await rechecks._asking[SUBJECT]

    try:
        assert not rechecks.unreadable(SUBJECT, 0.0)  # asked; no answer yet
        assert not rechecks.unreadable(SUBJECT, 0.5)  # one question at a time
        await answer(None)  # no answer from the reader (JetStream timed out)
        assert rechecks.unreadable(SUBJECT, 1.0)  # read, and the next question goes out
        # every other request waiting there reads it too while the next question is out
        assert all(rechecks.unreadable(SUBJECT, t) for t in (1.1, 1.5, 2.9))
        await answer(Reader(7, 3))  # the reader answers again: it has handed out up to sequence 7
        assert not rechecks.unreadable(SUBJECT, 3.0)  # read, and the next question goes out
        # that answer's question went out at 1.0: a request at sequence 7 or before, queued before
        # then and asked about after, was passed over; one after 7, or asked about before, was not
        assert rechecks.passed(SUBJECT, 7, after=0.0, before=1.5)
        assert not rechecks.passed(SUBJECT, 8, after=0.0, before=1.5)
        assert not rechecks.passed(SUBJECT, 7, after=0.0, before=0.9)
        assert not rechecks.passed(SUBJECT, 7, after=1.1, before=9.0)
        # it counts nothing left to hand out: whatever the stream still holds for it lies behind it
        await answer(Reader(7, 0))
        assert not rechecks.unreadable(SUBJECT, 4.0)
        assert rechecks.passed(SUBJECT, 9, after=2.0, before=3.5)
        assert not rechecks.passed(SUBJECT, 9, after=3.1, before=9.0)  # asked before it was queued
        await answer(None)
        assert not rechecks.unreadable(SUBJECT, 100.0)  # an answer that old is never read
        assert not rechecks._asking[SUBJECT].done()  # and a new question is out
    finally:
        rechecks.stop()


def test_a_reader_has_passed_what_it_handed_out_or_counts_nothing_left() -> None:
    assert Reader(delivered=7, pending=2).passed(7)
    assert not Reader(delivered=7, pending=2).passed(8)
    assert Reader(delivered=7, pending=0).passed(8)  # asked after 8 was stored: it skipped 8
    assert not Reader(delivered=0, pending=None).passed(1)  # no reader yet: the first take makes it
