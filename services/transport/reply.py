"""The reply side of one call: `Call` (the messages that arrived for it), `Outcome` and `Failure` (why
an attempt did not begin a reply) and `Reply`, the open reply stream, which owns its call.

Reply framing (see `corral.protocol.headers`): the agent that takes a request sends a ``claim``,
``ping``s while silent, then a ``head`` (Ollama's status and content type, maybe the first bytes
and maybe ``end``), plain data messages, and an ``end`` carrying the count of data messages sent
or an error.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from corral.protocol import headers as H
from corral.protocol.errors import AgentUnavailable, CorralError, ReplyOverflow, end_error
from corral.protocol.subjects import REGISTRY_SENDER
from nats.aio.msg import Msg

# the mark `corral.transport.calls.Transport` queues for an open reply when its connection came back
# (never on the wire): what the agent sent in between may be lost, so the reply ends there
CONNECTION_LOST = "connection-lost"


class Outcome(enum.Enum):
    """Why an attempt did not begin a reply."""

    NO_RESPONDERS = "no responders"
    BUSY = "busy"
    FAILED = "failed"


@dataclass(frozen=True)
class Failure:
    """An attempt an agent claimed and then failed before its head, with a retryable error (its
    Ollama refused the connection, reset it, closed it): worth trying elsewhere, but never again on
    that agent for this request; ``error`` is the answer when no agent is left to try."""

    agent: str
    error: CorralError


class Call:
    """One registered request: the reply messages routed to it, and the agent that claimed it.

    Its queue holds at most ``max_bytes`` of reply data (0: no bound). A reply that arrives faster
    than its reader takes it (a client that stops reading) overflows it: the queue is emptied, the
    call is ``overflowed`` and its reader gets `ReplyOverflow` once it has taken what came before.
    """

    __slots__ = ("_bytes", "_max_bytes", "agent", "overflowed", "queue", "replying", "rid")

    def __init__(self, rid: str, max_bytes: int = 0) -> None:
        self.rid = rid
        self.queue: asyncio.Queue[Msg | None] = asyncio.Queue()  # None: the overflow mark
        self.agent: str | None = None
        self.overflowed = False
        self.replying = False  # its head came and its end has not: a `Reply` reads it
        self._bytes = 0
        self._max_bytes = max_bytes

    def put(self, msg: Msg) -> bool:
        """Queue one reply message; False when it overflows the bound (or did before)."""
        if self.overflowed:
            return False
        size = len(msg.data)
        if self._max_bytes and self._bytes + size > self._max_bytes:
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self._bytes = 0
            self.queue.put_nowait(None)
            return False
        self._bytes += size
        self.queue.put_nowait(msg)
        return True

    def take(self) -> Msg:
        """The next queued message now; `asyncio.QueueEmpty` when there is none."""
        return self._taken(self.queue.get_nowait())

    async def next(self, timeout: float) -> Msg:
        try:
            return self.take()
        except asyncio.QueueEmpty:
            pass
        # asyncio.timeout, not wait_for: no task per wait, and a cancel is never swallowed when
        # the message arrives at the same moment (wait_for can lose it on Python 3.11)
        async with asyncio.timeout(timeout):
            return self._taken(await self.queue.get())

    def _taken(self, msg: Msg | None) -> Msg:
        if msg is None:
            self.queue.put_nowait(None)  # every later read fails the same way
            raise ReplyOverflow(
                f"reply cancelled: over {self._max_bytes} bytes of it waited unread (it came faster than it was read)"
            )
        self._bytes -= len(msg.data)
        return msg


class CallOwner(Protocol):
    """Where a call is registered (`corral.transport.calls.Transport`)."""

    def release(self, call: Call) -> bool:
        """Unregister ``call``; False when it was released already."""

    async def cancel(self, call: Call) -> None:
        """Tell the agent that claimed ``call`` to drop it."""

    def epoch(self) -> int:
        """How many times the owner's NATS connection came back so far."""

    def held(self, epoch: int) -> bool:
        """Whether the owner's connection is up and has not come back since ``epoch``."""

    async def took(self, call: Call, taken: int) -> None:
        """Tell the agent replying to ``call`` how many body bytes of it were taken."""


class ReplyStream:
    """What a requester reads: status, content type, the head's bytes (``first``), then the rest
    as it comes (`batches`); whole (`read`) or by NDJSON line (`lines`). Use it as ``async with``:
    leaving it ends what it still holds."""

    __slots__ = ()
    agent: str
    status: int
    content_type: str
    first: bytes
    ended: bool

    def batches(self) -> AsyncIterator[bytes]:
        """The body after ``first``, as it arrives."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def lines(self) -> AsyncIterator[bytes]:
        """The body as NDJSON lines (blank ones skipped), as they complete."""
        tail = self.first
        async for batch in self.batches():
            tail += batch
            *complete, tail = tail.split(b"\n")
            for raw in complete:
                if raw.strip():
                    yield raw
        for raw in tail.split(b"\n"):
            if raw.strip():
                yield raw

    async def read(self) -> bytes:
        """The whole body (first bytes plus the rest)."""
        return self.first + b"".join([b async for b in self.batches()])


class Reply(ReplyStream):
    """An open reply from the agent that claimed the request: status, content type, body stream.

    It owns its call: use it as ``async with reply:`` (or call `close`). Leaving it releases the
    call and, when the stream has not ended, tells the agent to cancel the work.
    """

    __slots__ = (
        "_call",
        "_data_msgs",
        "_epoch",
        "_idle",
        "_owner",
        "_taken",
        "_told",
        "_window",
        "agent",
        "content_type",
        "ended",
        "first",
        "status",
    )

    def __init__(
        self,
        owner: CallOwner,
        call: Call,
        status: int,
        content_type: str,
        first: bytes,
        *,
        ended: bool,
        idle_timeout: float,
        window: int = 0,
    ) -> None:
        """``window``: the agent sends at most that many body bytes ahead of what was taken (its
        head said so); what `batches` hands on is told to it, a quarter window at a time."""
        self._owner = owner
        self._window = window
        self._taken = len(first)  # body bytes handed on: the head's are the caller's before any batch
        self._told = 0  # ... and how many of them the agent was told of
        self._call = call
        self._idle = idle_timeout
        self.agent = call.agent or ""
        self.status = status
        self.content_type = content_type
        self.first = first
        self.ended = ended
        self._data_msgs = 0
        self._epoch = owner.epoch()  # as of the last message: silence since may be the connection's loss
        if ended:
            owner.release(call)
        else:
            call.replying = True

    async def batches(self) -> AsyncIterator[bytes]:
        """The body after ``first``: each item is everything that had arrived, joined.

        Raises `CorralError` when the agent reports a failure or goes silent mid-stream.
        """
        if self.ended:
            return
        call, timeout = self._call, self._idle
        try:
            await self._tell()  # the head's bytes, which may fill the window alone
            while True:
                try:
                    msg = await call.next(timeout)
                except TimeoutError:
                    if not self._owner.held(self._epoch):  # what followed may have been lost with it
                        lost = f"the NATS connection was lost while agent {self.agent} answered"
                        raise AgentUnavailable(f"{lost}: the rest of the reply did not come") from None
                    who = "the registry" if self.agent == REGISTRY_SENDER else f"agent {self.agent}"
                    raise AgentUnavailable(f"{who} stopped responding") from None
                self._epoch = self._owner.epoch()
                parts: list[bytes] = []
                pinged = False
                while True:
                    hdrs = msg.headers
                    if not hdrs:
                        self._data_msgs += 1
                        parts.append(msg.data)
                    elif hdrs.get(H.KIND) == H.PING:
                        pinged = True
                    elif hdrs.get(H.KIND) == H.END_KIND:
                        self.ended = True
                        if parts:
                            yield b"".join(parts)
                        self._check_end(hdrs)
                        return
                    elif hdrs.get(H.KIND) == CONNECTION_LOST:  # not ended: leaving cancels the work
                        if parts:
                            yield b"".join(parts)
                        lost = f"the NATS connection was lost while agent {self.agent} answered"
                        raise AgentUnavailable(f"{lost}: part of the reply may not have come")
                    try:
                        msg = call.take()
                    except asyncio.QueueEmpty:
                        break
                if parts:
                    batch = b"".join(parts) if len(parts) > 1 else parts[0]
                    yield batch
                    self._taken += len(batch)  # handed on: the window moves
                    await self._tell()
                if pinged:  # the agent is silent: it may wait for a read control that was lost (NATS
                    await self._tell(again=True)  # keeps none), so it hears the count again
        finally:
            await self.close()

    async def _tell(self, *, again: bool = False) -> None:
        """Tell the agent what was taken, once a quarter of its window more was: what is left
        unsaid is then under that, so an agent waiting for room always hears of it (``again``:
        even if it was told so already)."""
        if self._window and (again or self._taken - self._told >= self._window // 4):
            self._told = self._taken
            await self._owner.took(self._call, self._taken)

    def _check_end(self, hdrs: dict[str, str]) -> None:
        if H.ERROR_CODE in hdrs:
            raise end_error(hdrs)
        sent = int(hdrs.get(H.SEQ, self._data_msgs))
        if sent != self._data_msgs:
            raise AgentUnavailable(
                f"lost {sent - self._data_msgs} of {sent} reply messages from {self.agent}"
            )

    async def close(self) -> None:
        """Release the call; cancels the work on the agent if the stream has not ended."""
        if self._owner.release(self._call) and not self.ended:
            await self._owner.cancel(self._call)
