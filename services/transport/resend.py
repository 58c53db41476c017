"""A request to a service that outlives the service copy answering it.

A registry copy that stops (a rolling restart, a scale-in) first leaves its queue group, then ends
what it still runs with `ServiceStopping`. A request that may safely run twice, such as a pull
(Ollama resumes a partial download, so running it again costs only what was left), is then sent
again on the same subject, where a copy that stays takes it. Its reader sees one body: the first
reply's head and bytes, then the next reply's, its head's bytes included, as if one copy had
answered (a stream is handed on by whole lines, and a line the stop cut short is dropped). A pull's
progress thus carries on from about where it was.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from corral.protocol.errors import ServiceStopping
from corral.transport.calls import Transport
from corral.transport.reply import Reply, ReplyStream
from corral.transport.request import WorkRequest

log = logging.getLogger(__name__)

RESENDS: Final = 3  # copies that may stop one after another under one request: a rolling restart


async def send_resending(
    transport: Transport, subject: str, req: WorkRequest, *, timeout: float, resends: int = RESENDS
) -> ReplyStream | None:
    """`Transport.send_service` for a request that may run twice: while the copy serving it stops,
    before its head or after (`Resent`), it is sent again, up to ``resends`` times. None when no
    copy runs."""

    async def send() -> Reply | None:
        return await transport.send_service(subject, req, timeout=timeout)

    resent = Resent(send, subject, resends)
    return resent if await resent.begin() else None


class Resent(ReplyStream):
    """The replies of one request sent again each time the service copy serving it stops, read as
    one: status, content type and first bytes are the first reply's. The body is NDJSON lines."""

    __slots__ = (
        "_left",
        "_reply",
        "_send",
        "_subject",
        "_tail",
        "agent",
        "content_type",
        "ended",
        "first",
        "status",
    )

    def __init__(self, send: Callable[[], Awaitable[Reply | None]], subject: str, resends: int) -> None:
        self._send, self._subject, self._left = send, subject, resends
        self._reply: Reply | None = None  # the copy answering now
        self.agent = self.content_type = ""
        self.status = 0
        self.first = self._tail = b""
        self.ended = False

    async def begin(self) -> bool:
        """Send it until a copy answers with a head; False when none runs."""
        try:
            reply = await self._send()
        except ServiceStopping as stopped:
            reply = await self._again(stopped)
        if reply is None:
            return False
        self._reply = reply
        self.agent, self.status, self.content_type = reply.agent, reply.status, reply.content_type
        self.ended = reply.ended
        # a whole body is handed on as it is; a stream's, by whole lines (`batches`)
        self.first, self._tail = (reply.first, b"") if reply.ended else _lines(reply.first)
        return True

    async def batches(self) -> AsyncIterator[bytes]:
        tail = self._tail  # the bytes after the last whole line handed on
        while self._reply is not None:
            try:
                async for batch in self._reply.batches():
                    whole, tail = _lines(tail + batch)
                    if whole:
                        yield whole
            except ServiceStopping as stopped:
                following = await self._again(stopped)
                if following is None:
                    raise
            else:
                self.ended = True
                if tail:
                    yield tail  # the body's last line, without its newline
                return
            self._reply = following  # a line the stop cut short is dropped: the next copy says it again
            whole, tail = _lines(following.first)
            if whole:
                yield whole

    async def _again(self, stopped: ServiceStopping) -> Reply | None:
        """The next copy's reply; ``stopped`` again when the resends are spent; None when no copy
        is left to take it."""
        while self._left:
            self._left -= 1
            log.info("%s: the copy serving a request stopped (%s); sending it again", self._subject, stopped)
            try:
                return await self._send()
            except ServiceStopping as e:
                stopped = e
        raise stopped

    async def close(self) -> None:
        if self._reply is not None:
            await self._reply.close()


def _lines(data: bytes) -> tuple[bytes, bytes]:
    """``data`` split after its last newline: its whole lines, and the start of the next."""
    end = data.rfind(b"\n") + 1
    return data[:end], data[end:]
