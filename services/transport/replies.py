"""The reply stream's writer: what a service that takes a request sends back on its reply subject.

The stream (headers in `corral.protocol.headers`), in order::

    claim   the sender has the request (it carries Corral-Agent: <sender> and Corral-Request)
    ping    keep-alive while the answer is silent (a model loading, a long pull); an agent pings
            every request it holds now and then, with a reply-to of its own: NATS answers "no
            responders" there when nobody listens on the reply subject (`corral.agent.probes`)
    head    Corral-Status and Corral-Content-Type with the first body bytes; with Corral-End: 1 it
            is the whole answer
    data    header-less messages with the next body bytes (the cheap, frequent message)
    end     Corral-Seq: the number of data messages; with Corral-Error(-Code) on failure
    busy    instead of all of the above: the sender cannot take it, try elsewhere

No message is larger than the server's payload limit less `HEADER_HEADROOM`: a longer body is
split across data messages. A requester that reads in windows (``Corral-Window`` on the request)
gets at most that many body bytes ahead of what it has taken (its ``read`` controls say how many):
the writer waits for it (``held``), as a socket's sender waits for its reader, so a large answer or
a slow client has at most a window of it in NATS and in the requester (one that takes none of it
for `HOLD_S` ends it). A reply quick enough claims with its head (`claim_soon`): one message
instead of two.

Any sender may use it: the agent names itself in the claim; the registry writes its pull replies
with it too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from corral.protocol import headers as H
from corral.protocol.envelope import HEADER_HEADROOM
from corral.protocol.errors import CorralError, ReplyOverflow, ServiceStopping
from nats.aio.client import Client as NATS

__all__ = ["CLAIM_DELAY_S", "ReplyWriter", "send_busy"]

# A reply whose requester takes none of it for this long ends (its client stopped reading: it would
# hold the agent's slot and Ollama's runner for as long as its socket lives)
HOLD_S: Final = 300.0
# A claim waits this long for its head: a reply that quick claims with its head, one message instead
# of two (far inside a requester's claim timeout, which is seconds)
CLAIM_DELAY_S: Final = 0.005


async def send_busy(nc: NATS, reply: str, sender: str | None = None) -> None:
    """Answer a request on ``reply`` with ``busy``: this sender cannot take it now."""
    headers = {H.KIND: H.BUSY}
    if sender:
        headers[H.AGENT] = sender
    await nc.publish(reply, b"", headers=headers)


class ReplyWriter:
    """The reply stream of one request: ``rid``'s answer on ``reply``, claimed by ``sender``."""

    __slots__ = (
        "_claim_task",
        "_claim_timer",
        "_limit",
        "_nc",
        "_read",
        "_read_more",
        "_sent",
        "_window",
        "claimed",
        "done",
        "headed",
        "held",
        "last_pinged",
        "last_sent",
        "probe",
        "reply",
        "rid",
        "sender",
        "seq",
    )

    def __init__(self, nc: NATS, reply: str, rid: str, sender: str | None = None, *, window: int = 0) -> None:
        # nineteen attributes: where it writes, how far the stream got (claim, head, data messages,
        # end, times), and the window (its size, bytes sent and taken, the wait for more taken)
        self._nc = nc
        self.reply = reply
        self.rid = rid
        self.sender = sender
        self._limit = nc.max_payload - HEADER_HEADROOM
        self.claimed = False  # the requester knows who has it (a claim, or a head that says so)
        self.headed = False
        self.done = False  # the stream has ended: nothing more goes out
        self.seq = 0  # data messages sent
        self.last_sent = 0.0  # monotonic time of the last message
        self.last_pinged = time.monotonic()  # of the last ping (or the start): when the next is due
        self.probe = ""  # the claim's reply-to, where NATS says "no responders" if nobody heard it
        self._claim_timer: asyncio.TimerHandle | None = None
        self._claim_task: asyncio.Task[None] | None = None
        self._window = window  # 0: the requester reads as it comes
        self._sent = self._read = 0  # body bytes sent; taken by the requester, as it said
        self._read_more: asyncio.Event | None = None
        self.held = False  # waiting for the requester to take what was sent

    def took(self, header: str) -> None:
        """A read control's ``Corral-Read``: the requester has taken that many body bytes, and the
        window moves on (a value that is no count changes nothing)."""
        if not (header.isascii() and header.isdigit()):
            return
        taken = int(header)
        if taken > self._read:
            self._read = min(taken, self._sent)
            if self._read_more is not None:
                self._read_more.set()

    async def _room(self) -> None:
        """Wait until the window has room for more (the requester took enough); `ReplyOverflow`
        when it took none of it for `HOLD_S`."""
        if self._read_more is None:
            self._read_more = asyncio.Event()
        self.held = True
        try:
            async with asyncio.timeout(HOLD_S):
                while self._sent - self._read >= self._window:
                    self._read_more.clear()
                    await self._read_more.wait()
        except TimeoutError:
            raise ReplyOverflow(
                f"reply cancelled: its requester took none of it for {HOLD_S:.0f} s"
            ) from None
        finally:
            self.held = False

    @property
    def limit(self) -> int:
        """The most body bytes one message carries."""
        return self._limit

    def _claim_headers(self, headers: dict[str, str]) -> dict[str, str]:
        if self.sender:
            headers[H.AGENT] = self.sender
        headers[H.REQUEST] = self.rid
        return headers

    def _claimed_now(self) -> None:
        self.claimed = True
        if self._claim_timer is not None:
            self._claim_timer.cancel()
            self._claim_timer = None

    async def claim(self) -> None:
        """Tell the requester this sender has the request (once)."""
        if self.claimed:
            return
        self._claimed_now()
        self.last_sent = time.monotonic()
        await self._nc.publish(
            self.reply, b"", reply=self.probe, headers=self._claim_headers({H.KIND: H.CLAIM})
        )

    def claim_soon(self, delay: float = CLAIM_DELAY_S) -> None:
        """Claim after ``delay`` seconds unless the head goes out first and claims it."""
        self.last_sent = time.monotonic()  # not silent yet: no ping before the claim is due
        self._claim_timer = asyncio.get_running_loop().call_later(delay, self._claim_due)

    def _claim_due(self) -> None:
        self._claim_timer = None
        if not self.claimed:
            self._claim_task = asyncio.ensure_future(self.claim())

    def close(self) -> None:
        """Stop a pending delayed claim (the request is over)."""
        if self._claim_timer is not None:
            self._claim_timer.cancel()
            self._claim_timer = None

    async def _send(self, payload: bytes, headers: dict[str, str], reply_to: str = "") -> None:
        if not self.claimed:
            await self.claim()
        self.last_sent = time.monotonic()
        await self._nc.publish(self.reply, payload, reply=reply_to, headers=headers)

    async def ping(self, probe: str | None = None) -> None:
        """A keep-alive that names its sender; ``probe``: its reply-to, where NATS says "no
        responders" (status 503) when nobody listens on the reply subject."""
        self.last_pinged = time.monotonic()
        await self._send(b"", self._claim_headers({H.KIND: H.PING}), probe or "")

    async def head(self, status: int, content_type: str, body: bytes = b"", *, end: bool = False) -> None:
        """The answer's status and first bytes; ``end``: ``body`` is the whole answer."""
        headers = {H.KIND: H.HEAD, H.STATUS: str(status), H.CONTENT_TYPE: content_type}
        if end and len(body) <= self._limit:
            headers[H.END] = "1"
        elif self._window:
            headers[H.WINDOW] = str(self._window)  # the requester says what it took: it is kept to
        most = min(self._limit, self._window) if self._window and H.END not in headers else self._limit
        first, rest = (body, b"") if len(body) <= most else (body[:most], body[most:])
        self.headed = True
        probe = ""
        if not self.claimed:
            self._claimed_now()  # the head is the claim too: one message
            self._claim_headers(headers)
            probe = self.probe
        self.last_sent = time.monotonic()
        self._sent += len(first)
        await self._nc.publish(self.reply, first, reply=probe, headers=headers)
        if H.END in headers:
            self.done = True
            return
        if rest:
            await self.data(rest)
        if end:
            await self.end()

    async def data(self, body: bytes) -> None:
        """The next body bytes (split at the payload limit); nothing is sent for none."""
        if not body:
            return
        if not self.claimed:
            await self.claim()
        if len(body) <= self._limit and (
            not self._window or self._sent - self._read + len(body) <= self._window
        ):  # the hot path: one header-less message, no copy
            self.seq += 1
            self._sent += len(body)
            self.last_sent = time.monotonic()
            await self._nc.publish(self.reply, body)
            return
        view, i = memoryview(body), 0
        while i < len(body):  # in messages of at most the payload limit and what the window has room for
            size = self._limit
            if self._window:
                if self._sent - self._read >= self._window:
                    await self._room()
                size = min(size, self._window - (self._sent - self._read))
                if i + size < len(body) and (cut := body.rfind(b"\n", i, i + size)) >= i:
                    size = cut + 1 - i  # whole lines where it can: a reader spots an answer's last one
            part = bytes(view[i : i + size])
            i += size
            self.seq += 1
            self._sent += len(part)
            self.last_sent = time.monotonic()
            await self._nc.publish(self.reply, part)

    async def end(self, error: CorralError | None = None) -> None:
        """End the stream: the count of data messages, or the error that ended it (once: a stream
        already ended stays as it ended)."""
        if self.done:
            return
        if error is not None:
            headers = {H.KIND: H.END_KIND, H.ERROR_CODE: error.code, H.ERROR: error.message}
            if isinstance(error, ServiceStopping):
                headers[H.STOPPING] = "1"
        else:
            headers = {H.KIND: H.END_KIND, H.SEQ: str(self.seq)}
        self.done = True
        await self._send(b"", headers)
