"""`_Rechecks`: JetStream asked whether a queue's reader answers, once per subject for every request
waiting there, and its latest answer read by all of them, also while the next question is out."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import corral.gateway.queueing as queueing
import pytest
from corral.protocol.subjects import Subjects

SUBJECT = "t.queue.any.m"
RECHECK_S = 1.0


async def _settle() -> None:
    """Let the question's task and its done callback run (no time passes)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_every_waiting_request_reads_the_latest_answer_while_the_next_is_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers: list[asyncio.Future[bool]] = []

    async def reader_answers(*_: Any, **__: Any) -> bool:  # JetStream's answer, when the test gives it
        answers.append(asyncio.get_running_loop().create_future())
        return await answers[-1]

    monkeypatch.setattr(queueing, "reader_answers", reader_answers)
    transport = SimpleNamespace(
        nc=SimpleNamespace(jetstream=lambda: None), subjects=Subjects("t"), claim_timeout=2.0
    )
    rechecks = queueing._Rechecks(transport, RECHECK_S)  # type: ignore[arg-type]
    try:
        assert not rechecks.unreadable(SUBJECT, 0.0)  # asked; no answer yet
        assert not rechecks.unreadable(SUBJECT, 0.5)  # one question at a time
        await _settle()  # the question starts
        assert len(answers) == 1
        answers[0].set_result(False)  # no answer from the reader (JetStream timed out)
        await _settle()
        assert rechecks.unreadable(SUBJECT, 1.0)  # read, and the next question goes out
        await _settle()
        assert len(answers) == 2
        # every other request waiting there reads it too while the next question is out
        assert all(rechecks.unreadable(SUBJECT, t) for t in (1.1, 1.5, 2.9))
        answers[1].set_result(True)  # the reader answers again
        await _settle()
        assert not rechecks.unreadable(SUBJECT, 3.0)
        assert not rechecks.unreadable(SUBJECT, 100.0)  # an old answer is never read
    finally:
        rechecks.stop()
