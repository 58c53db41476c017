"""A lean keep-alive HTTP/1.1 client for the agent's one backend: an asyncio protocol over httptools.

The agent talks to one Ollama, on loopback or a LAN, with request bodies it already holds as bytes.
A general client (cookie jar, redirects, trace hooks, per-request timers and wrappers) costs more
CPU per request than the rest of the agent's path to NATS (bench/README, "Where the time goes").
This is the part the agent needs and nothing more:

- a pool of keep-alive connections, most recently used first, none created per request;
- a request written in one call, ``Host`` always the backend's own address, no ``Origin``;
- the answer's head as soon as it arrives, then its body as it arrives; when the reader falls
  behind, everything that came meanwhile is handed over as one piece (coalescing, no timers);
- read-side flow control: a reader that stops reading stops the socket, not memory;
- an answer left unread (a cancelled request) closes its connection, which tells Ollama to stop.

An idle connection the backend has closed is never reused. A request on a reused connection that
the backend closed before answering is sent again once on a new connection only for GET and HEAD:
anything else might already have run.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import AsyncIterator
from types import TracebackType
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 512 * 1024  # bytes buffered unread before the socket stops reading
_MAX_IDLE = 64  # idle keep-alive connections kept per backend
_RETRYABLE = frozenset({"GET", "HEAD"})  # sent again after a stale keep-alive connection
_BODILESS = frozenset({"GET", "HEAD"})  # no Content-Length header when they carry no body


class HTTPError(OSError):
    """The backend could not be reached, or broke off or garbled its answer."""


class StatusError(Exception):
    """An answer whose status is not 2xx (from `Response.raise_for_status`)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        self.status = status
        self.body = body


class Response:
    """An answer's head; its body is read with `read` or ``async for piece in response``."""

    __slots__ = ("status", "headers", "content_length", "_conn")

    def __init__(self, status: int, headers: dict[str, str], conn: _Connection) -> None:
        self.status = status
        self.headers = headers  # names in lower case
        cl = headers.get("content-length")
        self.content_length = int(cl) if cl is not None and cl.isdigit() else None
        self._conn = conn

    async def read(self) -> bytes:
        parts = [piece async for piece in self]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        while piece := await self._conn.next_piece():
            yield piece

    async def raise_for_status(self) -> None:
        if not 200 <= self.status < 300:
            raise StatusError(self.status, await self.read())


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._complete = False
        self.received = False  # any byte of the current answer came
        self._no_body = False  # a HEAD request: the answer ends with its head
        self._error: BaseException | None = None
        self.reusable = False  # the answer ended and the backend keeps the connection open
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(HTTPError(f"malformed HTTP answer: {e}"))
            self.close()

    def eof_received(self) -> bool | None:
        return False  # close the transport: the backend will send nothing more

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()  # a writer waiting to drain learns of the loss from the answer
        if self._head is None or self._complete:
            return
        if self._head.done() and self._reads_until_close():
            self._finish()  # a body delimited by the end of the connection has ended
        else:
            self._fail(HTTPError(f"connection closed before the answer ended{f': {exc}' if exc else ''}"))

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # ------------------------------------------------------------------ httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 1xx: an interim answer; the real head follows
            self._headers = {}
            return
        if self._head is not None and not self._head.done():
            self._head.set_result(Response(status, self._headers, self))
        if self._no_body:
            self._finish(reusable=False)

    def on_body(self, body: bytes) -> None:
        if self._no_body:
            return
        self._pieces.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() >= 200:
            self._finish(reusable=self._parser.should_keep_alive())

    # ------------------------------------------------------------------ the request
    def _reads_until_close(self) -> bool:
        return "content-length" not in self._headers and "chunked" not in self._headers.get(
            "transfer-encoding", ""
        )

    def _finish(self, reusable: bool = False) -> None:
        self._complete = True
        self.reusable = reusable
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def send(self, data: bytes, *, no_body: bool) -> asyncio.Future[Response]:
        assert self.transport is not None
        self._head = asyncio.get_running_loop().create_future()
        self._headers, self._pieces, self._buffered = {}, [], 0
        self._complete = self.received = False
        self._no_body = no_body
        self._error = None
        self.reusable = False
        self.transport.write(data)
        return self._head

    async def drained(self) -> None:
        if self._writable is not None:
            await self._writable

    async def next_piece(self) -> bytes:
        """Everything received since the last call, waiting for some; b"" once the answer has ended."""
        while not self._pieces:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        pieces, self._pieces, self._buffered = self._pieces, [], 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    @property
    def done(self) -> bool:
        """The answer ended cleanly and nothing of it is left unread."""
        return self._complete and not self._pieces and self._error is None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HTTPClient:
    """Keep-alive connections to one ``http://`` or ``https://`` base URL."""

    def __init__(self, base_url: str, *, connect_timeout: float = 10.0) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._authority = url.netloc.rsplit("@", 1)[-1].encode("idna")
        self._connect_timeout = connect_timeout
        self._ssl: _ssl.SSLContext | None = _ssl.create_default_context() if self._https else None
        self._idle: list[_Connection] = []
        self._closed = False

    def request(self, method: str, path: str, body: bytes | None = None) -> _Exchange:
        """``async with client.request(...) as response``: the response's head, its body to read."""
        return _Exchange(self, method, path, body)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # ------------------------------------------------------------------ pool
    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(_Connection, self._host, self._port, ssl=self._ssl)
        except TimeoutError as e:
            raise HTTPError(f"connect to {self._host}:{self._port} timed out") from e
        except OSError as e:
            raise HTTPError(f"cannot connect to {self._host}:{self._port}: {e}") from e
        return conn

    async def _acquire(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn, True
        return await self._connect(), False

    def _release(self, conn: _Connection) -> None:
        if (
            conn.done
            and conn.reusable
            and not conn.closed
            and not self._closed
            and len(self._idle) < _MAX_IDLE
        ):
            self._idle.append(conn)
        else:
            conn.close()

    def _encode(self, method: str, path: str, body: bytes | None) -> bytes:
        head = [method.encode("ascii"), b" ", (self._prefix + path).encode("utf-8"), b" HTTP/1.1\r\nHost: "]
        head.append(self._authority)
        if body:
            head.append(b"\r\nContent-Type: application/json\r\nContent-Length: ")
            head.append(str(len(body)).encode("ascii"))
        elif method not in _BODILESS:
            head.append(b"\r\nContent-Length: 0")
        head.append(b"\r\n\r\n")
        if body:
            head.append(body)
        return b"".join(head)


class _Exchange:
    """One request and its answer; leaving it hands the connection back, or closes it if unread."""

    __slots__ = ("_client", "_method", "_path", "_body", "_conn")

    def __init__(self, client: HTTPClient, method: str, path: str, body: bytes | None) -> None:
        self._client = client
        self._method = method
        self._path = path
        self._body = body
        self._conn: _Connection | None = None

    async def __aenter__(self) -> Response:
        client = self._client
        data = client._encode(self._method, self._path, self._body)
        while True:
            conn, reused = await client._acquire()
            self._conn = conn
            try:
                head = conn.send(data, no_body=self._method == "HEAD")
                await conn.drained()
                return await head
            except HTTPError:
                conn.close()
                if reused and not conn.received and self._method in _RETRYABLE:
                    continue  # the backend closed an idle connection as it was reused
                raise
            except BaseException:
                conn.close()
                raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._conn is not None:
            self._client._release(self._conn)
            self._conn = None
