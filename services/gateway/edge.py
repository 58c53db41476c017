"""The bounds every HTTP request meets before it is served: body size, body time, concurrency.

`Edge.serve` reads the request body first — at most ``max_body_bytes``, whole within
``body_timeout_s`` — and hands the app a ``receive`` that replays it, so neither the raw model path
nor FastAPI ever waits on a slow client or holds more than the cap. Requests with a body (anything
but GET and HEAD) count against ``max_requests``; one more is Ollama's 503 "server busy" at once.
The bodies held by all requests together, read or being read, stay within ``max_held_bytes``,
counted as their bytes arrive (what they take in memory; a declared length alone takes nothing, so
idle connections cannot block the rest): a body whose bytes would pass it is the same 503, so many
large bodies at once cannot exhaust the gateway's memory.

A blob upload (``POST /api/blobs/:digest``) with a ``Content-Length`` is the exception: its body
may be many gigabytes, so the edge does not read it. The app finds a `ClientBody` under
`STREAM`, which the transport reads only as the agent asks for chunks (about one chunk held at a
time, `corral.transport.bodies`), of any size, each piece due within ``body_timeout_s`` of asking
for it (a stall timeout, not a whole-body one). A client that stalls gets 408, one whose body is
longer or shorter than it declared 400; either way the upload ends at the agent and everything it
held is released. Without a ``Content-Length`` (chunked) an upload is read whole like any body.
"""

from __future__ import annotations

import asyncio
import logging

from corral.gateway.asgi import App, Message, Receive, Scope, Send
from corral.gateway.errors import dialect, refuse
from corral.protocol.envelope import MAX_BODY_SIZE
from corral.protocol.errors import BUSY_MESSAGE, NoCapacity
from corral.transport.bodies import BodyGone

log = logging.getLogger(__name__)


UNCOUNTED = frozenset({"GET", "HEAD"})
BODY = "corral.body"  # the scope key under which the app finds the body the edge read
STREAM = "corral.stream"  # ... or, for a blob upload, the `ClientBody` it did not read
STREAMED_PREFIX = "/api/blobs/"  # POSTs under this with a Content-Length are streamed
_DISCONNECT: Message = {"type": "http.disconnect"}


class Refused(Exception):
    """A request refused at the edge: its HTTP status and Ollama-style message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Edge:
    __slots__ = (
        "_admitted",
        "_ended",
        "_held_more",
        "active",
        "body_timeout_s",
        "held",
        "max_body_bytes",
        "max_held_bytes",
        "max_requests",
    )

    def __init__(
        self, *, max_body_bytes: int, max_requests: int, body_timeout_s: float, max_held_bytes: int = 1 << 62
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_requests = max_requests
        self.body_timeout_s = body_timeout_s
        self.max_held_bytes = max_held_bytes
        self.active = 0  # requests with a body being served now
        self.held = 0  # bytes of request bodies held now, by all of them
        self._admitted = asyncio.Event()
        self._ended = asyncio.Event()
        self._held_more = asyncio.Event()

    async def wait_active(self, n: int, timeout: float) -> None:
        """Wait until at least ``n`` counted requests are being served (woken by each admission)."""
        async with asyncio.timeout(timeout):
            while self.active < n:
                self._admitted.clear()
                await self._admitted.wait()

    async def wait_held(self, n: int, timeout: float) -> None:
        """Wait until request bodies hold at least ``n`` bytes (woken by each body chunk read)."""
        async with asyncio.timeout(timeout):
            while self.held < n:
                self._held_more.clear()
                await self._held_more.wait()

    async def wait_idle(self, timeout: float) -> None:
        """Wait until no counted request is being served (woken by each one that ends)."""
        async with asyncio.timeout(timeout):
            while self.active:
                self._ended.clear()
                await self._ended.wait()

    async def serve(self, scope: Scope, receive: Receive, send: Send, app: App) -> None:
        """Serve one HTTP request through ``app`` within the bounds."""
        counted = scope["method"] not in UNCOUNTED
        api = dialect(scope["path"])
        if counted and self.active >= self.max_requests:
            await refuse(send, NoCapacity.status, BUSY_MESSAGE, api=api)
            return
        self.active += counted
        self._admitted.set()
        held = [0]  # this request's share of `held`, given back when it ends
        try:
            try:
                declared = _content_length(scope)
                if declared and scope["method"] == "POST" and scope["path"].startswith(STREAMED_PREFIX):
                    await self._stream(scope, ClientBody(receive, declared, self.body_timeout_s), send, app)
                    return
                body = await self._read(scope, receive, declared, held)
            except ConnectionResetError:
                return
            except Refused as e:
                await refuse(send, e.status, e.message, api=api, close=True)
                return
            scope[BODY] = body  # read once: the model routes take it from here, others from receive
            await app(scope, _replay(body, receive), send)
        finally:
            self.held -= held[0]
            self.active -= counted
            self._ended.set()

    def _hold(self, held: list[int], more: int) -> None:
        """Count ``more`` bytes of a request's body as held; past the budget: 503 server busy."""
        if self.held + more > self.max_held_bytes:
            log.warning(
                "request bodies held would pass %d bytes: refusing one of %d", self.max_held_bytes, more
            )
            raise Refused(NoCapacity.status, BUSY_MESSAGE)
        self.held += more
        held[0] += more
        self._held_more.set()

    async def _stream(self, scope: Scope, body: ClientBody, send: Send, app: App) -> None:
        if body.size > MAX_BODY_SIZE:
            raise Refused(413, f"request body too large: over {MAX_BODY_SIZE} bytes")
        started = False

        async def tracked(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        scope[STREAM] = body
        try:
            await app(scope, body.receive_after, tracked)
        finally:
            body.close()
        if body.error is not None and not started:  # the upload ended for the client's fault: say why
            await refuse(send, body.error.status, body.error.message, api="ollama", close=True)

    async def _read(self, scope: Scope, receive: Receive, declared: int | None, held: list[int]) -> bytes:
        if declared is not None and declared > self.max_body_bytes:
            raise Refused(413, f"request body too large: over {self.max_body_bytes} bytes")
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        raise ConnectionResetError("client disconnected")
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise Refused(413, f"request body too large: over {self.max_body_bytes} bytes")
                    self._hold(held, len(chunk))
                    parts.append(chunk)
                    if not msg.get("more_body"):
                        return b"".join(parts)
        except TimeoutError:
            log.info(
                "%s %s: body not received within %.0fs", scope["method"], scope["path"], self.body_timeout_s
            )
            raise Refused(408, f"request body not received within {self.body_timeout_s:g}s") from None


class ClientBody:
    """A client's request body read only as it is asked for (`corral.transport.bodies.BodySource`):
    of ``size`` bytes as declared, each piece due within ``stall_s`` of asking for it.

    Reads are sequential (the transport serves one chunk request at a time); a ``receive`` that is
    still pending when a read gives up waiting is kept for the next read, never cancelled, so no
    piece is lost. ``receive_after`` is the app's ``receive``: it waits until the body has come
    whole (or failed), then watches the client, so the app's disconnect watch never races the reads.
    """

    __slots__ = (
        "_asked_at",
        "_buffered",
        "_ended",
        "_got",
        "_next",
        "_pieces",
        "_receive",
        "_settled",
        "_stall_s",
        "disconnected",
        "error",
        "size",
    )

    def __init__(self, receive: Receive, size: int, stall_s: float) -> None:
        self._receive = receive
        self.size = size
        self._stall_s = stall_s
        self._pieces: list[bytes] = []
        self._buffered = 0  # bytes received and not handed out yet
        self._got = 0  # bytes received in all
        self._ended = False  # the client said the body is over (``more_body`` false)
        self._next: asyncio.Task[Message] | None = None  # the receive under way
        self._asked_at = 0.0
        self._settled = asyncio.Event()  # the body came whole, or failed
        self.error: Refused | None = None  # why the client is answered 400/408
        self.disconnected = False

    @property
    def held(self) -> int:
        return self._buffered

    async def read(self, limit: int, wait: float) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self._buffered < limit and self._got < self.size:
            self._check()
            if self._next is None:
                self._next = asyncio.create_task(self._pull(), name="client-body")
                self._asked_at = loop.time()
            stall_at = self._asked_at + self._stall_s
            done, _ = await asyncio.wait((self._next,), timeout=max(min(deadline, stall_at) - loop.time(), 0))
            if not done:
                if loop.time() >= stall_at:
                    log.info("upload of %d bytes: nothing received for %.0fs", self.size, self._stall_s)
                    self._fail(Refused(408, f"request body stalled: nothing received for {self._stall_s:g}s"))
                break
            msg, self._next = self._next.result(), None
            self._take(msg)
        self._check()
        return self._hand_out(limit)

    async def _pull(self) -> Message:
        return await self._receive()

    def _check(self) -> None:
        if self.disconnected:
            raise BodyGone("the client went away")
        if self.error is not None:
            raise BodyGone(self.error.message)

    def _take(self, msg: Message) -> None:
        if msg["type"] == "http.disconnect":
            self.disconnected = True
            self._fail(None)
            return
        piece: bytes = msg.get("body", b"")
        self._got += len(piece)
        if self._got > self.size:
            self._fail(Refused(400, "request body longer than its content-length"))
            return
        if piece:
            self._pieces.append(piece)
            self._buffered += len(piece)
        if not msg.get("more_body"):
            self._ended = True
            if self._got < self.size:
                self._fail(Refused(400, "request body shorter than its content-length"))
                return
        if self._got == self.size:
            self._settled.set()

    def _hand_out(self, limit: int) -> bytes:
        if not self._pieces:
            return b""
        data = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
        out, rest = data[:limit], data[limit:]
        self._pieces = [rest] if rest else []
        self._buffered = len(rest)
        return out

    def _fail(self, error: Refused | None) -> None:
        if self.error is None:
            self.error = error
        self._pieces, self._buffered = [], 0
        self._settled.set()
        if self._next is not None:
            self._next.cancel()
            self._next = None

    async def receive_after(self) -> Message:
        """The app's ``receive``: once the body has come whole, the client's next message (its
        disconnect); a body that failed reads as a disconnect."""
        await self._settled.wait()
        while not (self.disconnected or self.error is not None):
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                self.disconnected = True
            elif self._ended:
                return msg
            elif msg.get("body"):
                self._fail(Refused(400, "request body longer than its content-length"))
            else:
                self._ended = not msg.get("more_body")
        return _DISCONNECT

    def close(self) -> None:
        """Stop reading the client; nothing is held after it."""
        if self._next is not None:
            self._next.cancel()
            self._next = None
        self._pieces, self._buffered = [], 0


def _content_length(scope: Scope) -> int | None:
    for k, v in scope["headers"]:
        if k == b"content-length":
            if not (v.isascii() and v.isdigit()):
                raise Refused(400, "invalid content-length")
            return int(v)
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body read already, then waits on the client (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
