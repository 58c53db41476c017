"""Large bodies: a request body too big for one NATS message stays with its sender, which serves it
in chunks to the agent that took the request; `fetch_body` is the agent's side of the exchange.

The exchange, on ``body.{sender}.{rid}`` (NATS request/reply, one chunk request at a time)::

    request  payload: the byte offset wanted, as decimal text
    reply    Corral-Body-Size: the body's size, on every answer, and then one of
             - payload: the bytes from that offset, at most max_payload less HEADER_HEADROOM
             - empty, Corral-Kind: ping — "not yet": the body is still arriving at the sender and
               nothing new came within `BODY_WAIT_S`; ask again for the same offset
             - empty, Corral-Error (+ Corral-Error-Code) — the body cannot be served: its client
               stalled, went away or sent more or less than it declared, the offset was passed
               already, or the request is not (any more) the sender's; the receiver gives up

Two kinds of body are kept. Bytes held whole (a large JSON request) answer any offset, any number of
times. A `BodySource` is a body still arriving from the sender's own client (a blob upload of any
size): it is read only as chunks are asked for, in order — the next offset, or the last chunk again
(a request retried after its answer was lost) — so the sender holds about one chunk of it at a time.
Its chunks are served from a task of its own, so a slow client never holds up the subscription that
serves every other body; `BODY_WAIT_S` bounds each answer, and the receiver's request timeout
(`CHUNK_TIMEOUT_S`) is well above it, so a client that is merely slow never fails the receiver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Final, Protocol

import nats.errors
from corral.protocol import headers as H
from corral.protocol.envelope import HEADER_HEADROOM
from corral.protocol.errors import BackendError, BadRequest, CorralError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

log = logging.getLogger(__name__)

BODY_WAIT_S: Final = 2.0  # a streamed body's chunk request is answered within this, "not yet" if need be
CHUNK_TIMEOUT_S: Final = 10.0  # the receiver's timeout on one chunk request
CHUNK_RETRIES: Final = 1  # a chunk request that timed out is asked again this often (same offset)
MAX_BODY_WAIT_S: Final = 3600.0  # "not yet" answers in a row the receiver accepts, in seconds
_INBOX: Final = 2  # chunk requests queued for one streamed body (its receiver asks one at a time)


class BodyGone(Exception):
    """A streamed body that cannot be served (any more); the message says why."""


class BodySource(Protocol):
    """A body still arriving at the sender, read in order (the gateway's client upload)."""

    @property
    def size(self) -> int:
        """The bytes the body declares it has."""
        ...

    @property
    def held(self) -> int:
        """Bytes of it held in memory now."""
        ...

    async def read(self, limit: int, wait: float) -> bytes:
        """The next bytes, at most ``limit``: once ``limit`` are here or the body is complete, else
        whatever came within ``wait`` seconds (maybe nothing). Raises `BodyGone`."""
        ...


class _Streamed:
    """One streamed body being served: where its receiver is, the last chunk (for a retry)."""

    __slots__ = ("inbox", "last", "last_offset", "pos", "source", "task")

    def __init__(self, source: BodySource) -> None:
        self.source = source
        self.pos = 0  # bytes served so far
        self.last = b""  # the chunk served last, from last_offset
        self.last_offset = -1
        self.inbox: asyncio.Queue[Msg] = asyncio.Queue(_INBOX)
        self.task: asyncio.Task[None] | None = None

    async def chunk(self, offset: int, limit: int) -> bytes:
        if offset == self.last_offset and self.last:
            return self.last  # the receiver asks again: its answer was lost
        if offset != self.pos:
            raise BodyGone(f"offset {offset} is not the next one ({self.pos})")
        self.last, self.last_offset = b"", -1  # the receiver has it: let it go before reading more
        data = await self.source.read(min(limit, self.source.size - self.pos), BODY_WAIT_S)
        if data:
            self.last, self.last_offset = data, offset
            self.pos += len(data)
        return data


class LargeBodies:
    """The bodies of this sender's calls that were too large to publish, by request id."""

    __slots__ = ("_bodies", "_nc", "_prefix", "_streams", "_tasks")

    def __init__(self, nc: NATS, prefix: int) -> None:
        self._nc = nc
        self._bodies: dict[str, bytes] = {}
        self._streams: dict[str, _Streamed] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # chunk servers, also while they wind down
        self._prefix = prefix  # length of the body subject before the request id

    def keep(self, rid: str, body: bytes | BodySource) -> None:
        if isinstance(body, bytes):
            self._bodies[rid] = body
            return
        s = _Streamed(body)
        s.task = asyncio.create_task(self._serve_stream(rid, s), name=f"body-{rid}")
        self._tasks.add(s.task)
        s.task.add_done_callback(self._tasks.discard)
        self._streams[rid] = s

    def drop(self, rid: str) -> None:
        self._bodies.pop(rid, None)
        s = self._streams.pop(rid, None)
        if s is not None and s.task is not None:
            s.task.cancel()  # awaited by `close` if it has not ended by then

    @property
    def held(self) -> int:
        """Bytes of kept bodies in memory now: whole bodies, and what streamed ones hold."""
        return sum(map(len, self._bodies.values())) + sum(
            len(s.last) + s.source.held for s in self._streams.values()
        )

    @property
    def streams(self) -> int:
        """Streamed bodies being served."""
        return len(self._streams)

    async def close(self) -> None:
        for rid in list(self._streams):
            self.drop(rid)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def _chunk(self) -> int:
        return self._nc.max_payload - HEADER_HEADROOM

    async def serve(self, msg: Msg) -> None:
        """Answer one chunk request (the subscription's callback): a whole body's chunk at once, a
        streamed body's by its own task."""
        if not msg.reply:
            return
        rid = msg.subject[self._prefix :]
        if (s := self._streams.get(rid)) is not None:
            try:
                s.inbox.put_nowait(msg)
            except asyncio.QueueFull:
                await self._gone(msg, s.source.size, "too many chunk requests at once")
            return
        body = self._bodies.get(rid)
        offset = _offset(msg)
        if body is None or offset is None:
            await self._gone(msg, 0 if body is None else len(body), "request body no longer available")
            return
        await self._publish(msg.reply, body[offset : offset + self._chunk], {H.BODY_SIZE: str(len(body))})

    async def _serve_stream(self, rid: str, s: _Streamed) -> None:
        size = s.source.size
        while True:
            msg = await s.inbox.get()
            offset = _offset(msg)
            try:
                if offset is None:
                    raise BodyGone("bad offset")
                data = await s.chunk(offset, self._chunk)
            except BodyGone as e:
                log.info("body of %s: %s", rid, e)
                await self._gone(msg, size, str(e))
                continue
            except Exception as e:  # its source failed otherwise: say so now, not at the agent's timeout
                log.exception("body of %s: its source failed", rid)
                await self._gone(msg, size, f"request body failed: {e}")
                continue
            headers = {H.BODY_SIZE: str(size)}
            if not data:
                headers[H.KIND] = H.PING  # not yet: ask again
            await self._publish(msg.reply, data, headers)

    async def _gone(self, msg: Msg, size: int, why: str) -> None:
        headers = {H.BODY_SIZE: str(size), H.ERROR: why, H.ERROR_CODE: BadRequest.code}
        await self._publish(msg.reply, b"", headers)

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        try:
            await self._nc.publish(subject, data, headers=headers)
        except nats.errors.Error as e:  # the connection is closing: the receiver's timeout ends it
            log.debug("cannot answer a chunk request on %s: %s", subject, e)


def _offset(msg: Msg) -> int | None:
    raw = msg.data or b"0"
    return int(raw) if raw.isascii() and raw.isdigit() else None


async def fetch_body(nc: NATS, subject: str, size: int) -> AsyncIterator[bytes]:
    """The receiver's side: a large body's chunks from its sender's ``subject``, in order, as they
    come (never joined). Raises the sender's error as a `CorralError`, `BackendError` when the
    sender stops answering or the body is not the size declared, and NATS errors as they are."""
    got = 0
    waiting_since = time.monotonic()
    retries = CHUNK_RETRIES
    while got < size:
        try:
            msg = await nc.request(subject, str(got).encode(), timeout=CHUNK_TIMEOUT_S)
        except nats.errors.TimeoutError:
            if retries <= 0:
                raise BackendError("request body: its sender stopped answering") from None
            retries -= 1
            continue
        h = msg.headers or {}
        if H.ERROR in h:
            raise _error(h.get(H.ERROR_CODE, ""), f"request body unavailable: {h[H.ERROR]}")
        if not msg.data:
            if h.get(H.KIND) == H.PING and time.monotonic() - waiting_since < MAX_BODY_WAIT_S:
                continue
            raise BackendError("request body no longer available")
        if got + len(msg.data) > size:
            raise BackendError("request body longer than declared")
        got += len(msg.data)
        waiting_since, retries = time.monotonic(), CHUNK_RETRIES
        yield msg.data


def _error(code: str, message: str) -> CorralError:
    return BadRequest(message) if code == BadRequest.code else BackendError(message)


__all__ = ["BODY_WAIT_S", "CHUNK_TIMEOUT_S", "BodyGone", "BodySource", "LargeBodies", "fetch_body"]
