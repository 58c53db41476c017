"""The bounds every HTTP request meets before it is served: body size, body time, concurrency.

`Edge.serve` reads the request body first — at most ``max_body_bytes``, whole within
``body_timeout_s`` — and hands the app a ``receive`` that replays it, so neither the raw model path
nor FastAPI ever waits on a slow client or holds more than the cap. Requests with a body (anything
but GET and HEAD) count against ``max_requests``; one more is Ollama's 503 "server busy" at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from corral.gateway.errors import JSON, native_body, openai_body
from corral.protocol.errors import BUSY_MESSAGE, NoCapacity

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

UNCOUNTED = frozenset({"GET", "HEAD"})
BODY = "corral.body"  # the scope key under which the app finds the body the edge read


class Refused(Exception):
    """A request refused at the edge: its HTTP status and Ollama-style message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Edge:
    __slots__ = ("_admitted", "active", "body_timeout_s", "max_body_bytes", "max_requests")

    def __init__(self, *, max_body_bytes: int, max_requests: int, body_timeout_s: float) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_requests = max_requests
        self.body_timeout_s = body_timeout_s
        self.active = 0  # requests with a body being served now
        self._admitted = asyncio.Event()

    async def wait_active(self, n: int, timeout: float) -> None:
        """Wait until at least ``n`` counted requests are being served (woken by each admission)."""
        async with asyncio.timeout(timeout):
            while self.active < n:
                self._admitted.clear()
                await self._admitted.wait()

    async def serve(self, scope: Scope, receive: Receive, send: Send, app: App) -> None:
        """Serve one HTTP request through ``app`` within the bounds."""
        counted = scope["method"] not in UNCOUNTED
        openai = scope["path"].startswith("/v1/")
        if counted and self.active >= self.max_requests:
            await _refuse(send, Refused(NoCapacity.status, BUSY_MESSAGE), openai=openai, close=False)
            return
        self.active += counted
        self._admitted.set()
        try:
            try:
                body = await self._read(scope, receive)
            except ConnectionResetError:
                return
            except Refused as e:
                await _refuse(send, e, openai=openai, close=True)
                return
            scope[BODY] = body  # read once: the model routes take it from here, others from receive
            await app(scope, _replay(body, receive), send)
        finally:
            self.active -= counted

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        declared = _content_length(scope)
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
                    parts.append(chunk)
                    if not msg.get("more_body"):
                        return b"".join(parts)
        except TimeoutError:
            log.info(
                "%s %s: body not received within %.0fs", scope["method"], scope["path"], self.body_timeout_s
            )
            raise Refused(408, f"request body not received within {self.body_timeout_s:g}s") from None


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

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send: Send, err: Refused, *, openai: bool, close: bool) -> None:
    status = err.status
    body = openai_body(status, err.message) if openai else native_body(err.message)
    headers = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the body may still be on its way: do not read it as the next request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
