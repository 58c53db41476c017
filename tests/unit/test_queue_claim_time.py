"""`FleetQueue.wait` times a queued request's wait to its claim, not to its head: an unstreamed
reply sends its head only once it is whole, so ``X-Corral-Queue-Ms`` would count the generation."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import corral.gateway.queueing as queueing
import pytest
from corral.gateway.metrics import new_decision
from corral.gateway.settings import GatewaySettings
from corral.protocol import headers as H
from corral.protocol.subjects import Subjects
from corral.runtime.workqueue import Queued
from corral.transport.reply import Outcome
from corral.transport.request import model_work
from nats.aio.msg import Msg


class _Call:
    """A call whose claim is already there."""

    async def next(self, timeout: float) -> Msg:
        return Msg(_client=None, subject="r", headers={H.KIND: H.CLAIM, H.AGENT: "a"})  # type: ignore[arg-type]


class _Transport:
    """As much of `corral.transport.Transport` as a queued wait uses; its handshake waits for the
    head until the test lets it go, and notes what the decision said meanwhile."""

    def __init__(self, decision: Any) -> None:
        self.subjects = Subjects("t")
        self.tracer = None  # the global one: a no-op here
        self.nc = SimpleNamespace(jetstream=lambda: None)
        self.claim_timeout = 2.0
        self.decision = decision
        self.head = asyncio.Event()
        self.at_head = asyncio.Event()
        self.waited_at_head: float | None = None

    def register(self, *_: Any, **__: Any) -> tuple[_Call, dict[str, str], bytes]:
        return _Call(), {}, b"{}"

    async def handshake(self, *_: Any) -> Outcome:
        self.waited_at_head = self.decision.queue_s  # the claim has come; the head has not
        self.at_head.set()
        await self.head.wait()
        return Outcome.FAILED

    def release(self, _: Any) -> None:
        pass

    async def cancel(self, _: Any) -> None:
        pass


async def test_the_wait_is_set_at_the_claim_before_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    async def enqueue(*_: Any, **__: Any) -> Queued:
        return Queued("stream", 1)

    monkeypatch.setattr(queueing, "enqueue", enqueue)
    decision = new_decision()
    transport = _Transport(decision)
    queue = queueing.FleetQueue(transport, SimpleNamespace(), SimpleNamespace(), GatewaySettings())  # type: ignore[arg-type]
    req = model_work("/api/generate", b'{"model":"m","stream":false}', "m")
    route = SimpleNamespace(key="m:latest")
    waiting = asyncio.create_task(queue.wait(req, route, time.monotonic() + 60, set(), decision))  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(transport.at_head.wait(), 5)
        assert transport.waited_at_head is not None and transport.waited_at_head >= 0  # set by then
        assert decision.queue_s == transport.waited_at_head  # and not moved by the head's coming
    finally:
        transport.head.set()
        assert await waiting is None
        queue.stop()
