"""One batch line through the gateway's own HTTP path, in-process: a POST of the line's body to its
url with ``X-Corral-Priority: batch``, so aliases, fallbacks, routing, limits and metrics apply to
it as to any client's request. With API keys on, it runs as the key that made the batch (its model
allow-list and priority cap), and counts in that key's usage and tokens per minute like any of its
requests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from corral.gateway.access import TAIL_BYTES, ApiKey
from corral.gateway.asgi import App, Message, Scope
from corral.gateway.auth import KEY, Access
from corral.protocol.priority import BATCH, HTTP_HEADER


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


def _scope(url: str, body: bytes, key: ApiKey | None) -> Scope:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": url,
        "raw_path": url.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (HTTP_HEADER, BATCH.encode()),
        ],
        "client": None,
        "server": None,
        "state": {},
    }
    if key is not None:
        scope[KEY] = key
    return scope


async def call(app: App, url: str, body: bytes, *, key: ApiKey | None, access: Access | None) -> Answer:
    """POST ``body`` to ``url`` through ``app`` (the gateway behind its edge bounds); the whole answer.
    Cancelling it is a client that went away: the gateway cancels the work on its agent."""
    scope = _scope(url, body, key)
    answered = asyncio.Event()
    delivered = False
    status = 0
    parts: list[bytes] = []

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(msg: Message) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        elif msg["type"] == "http.response.body":
            parts.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                answered.set()

    try:
        await app(scope, receive, send)
    finally:
        answered.set()
    reply = b"".join(parts)
    if key is not None and access is not None:
        tokens = access.record(key, scope, status, reply[-TAIL_BYTES:])
        await access.count_tokens(key, tokens)
    return Answer(status, reply)
