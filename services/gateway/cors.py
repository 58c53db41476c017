"""The gate browsers meet before anything else (`corral.gateway.origins` has the rules): a ``Host``
that is not local on a loopback gateway, or an ``Origin`` that is not allowed, is 403 with an empty
body, as Ollama answers; an ``OPTIONS`` from an allowed origin is a CORS preflight, 204 (Ollama's CORS
middleware takes every one as such); every answer to an allowed origin carries
``Access-Control-Allow-Origin``. Requests without an ``Origin`` (every non-browser client) pass with
nothing added, but for an ``OPTIONS`` to a loopback gateway from a local Host, which Ollama's host
check answers 204 itself."""

from __future__ import annotations

import socket
from typing import Final

from corral.gateway.asgi import App, Message, Receive, Scope, Send
from corral.gateway.origins import Origins, is_loopback

METHODS: Final = b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
MAX_AGE: Final = b"43200"  # seconds a browser may keep a preflight's answer (12 hours)
# The request headers a page may send: Ollama's list (its server's CORS configuration, the OpenAI
# SDK's own among them), then Corral's (priority, conversation, strategy, pull placement) and the
# W3C trace context a page's OpenTelemetry instrumentation adds (the gateway carries it on)
ALLOW_HEADERS: Final = b", ".join(
    [
        b"Authorization", b"Content-Type", b"User-Agent", b"Accept", b"X-Requested-With", b"OpenAI-Beta",
        *(b"X-Stainless-" + h for h in (
            b"Arch", b"Async", b"Custom-Poll-Interval", b"Helper-Method", b"Lang", b"Os",
            b"Package-Version", b"Poll-Helper", b"Retry-Count", b"Runtime", b"Runtime-Version",
            b"Timeout",
        )),
        b"X-Corral-Priority", b"X-Corral-Session", b"X-Corral-Replicas", b"X-Corral-Vendor",
        b"X-Load-Balancing-Strategy", b"X-Enforce-Strategy", b"Traceparent", b"Tracestate",
    ]
)  # fmt: skip


def machine_origins(listen: str, extra: str) -> Origins:
    """The rules for a gateway listening on ``listen`` with ``CORRAL_ORIGINS`` = ``extra``: this
    machine's name and the addresses it resolves to count as local."""
    hostname = socket.gethostname()
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(hostname, None)}
    except OSError:
        addresses = set()
    return Origins(extra.split(","), check_host=is_loopback(listen), hostname=hostname, addresses=addresses)


async def _forbidden(send: Send) -> None:
    """Ollama's 403, empty; the connection closes (a body the request sends may still be coming)."""
    head = [(b"content-length", b"0"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 403, "headers": head})
    await send({"type": "http.response.body", "body": b""})


async def _no_content(send: Send, head: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": [*head, (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


class Gate:
    __slots__ = ("origins",)

    def __init__(self, origins: Origins) -> None:
        self.origins = origins

    async def serve(self, scope: Scope, receive: Receive, send: Send, app: App) -> None:
        host = origin = asked_headers = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"access-control-request-headers":
                asked_headers = value
        if not self.origins.host_allowed(host):
            await _forbidden(send)
            return
        if origin is None:
            if scope["method"] == "OPTIONS" and self.origins.check_host:
                await _no_content(send, [])
                return
            await app(scope, receive, send)
            return
        if not self.origins.origin_allowed(origin, host):
            await _forbidden(send)
            return
        allow = [
            (b"access-control-allow-origin", b"*" if self.origins.any_origin else origin.encode("latin-1")),
            (b"vary", b"Origin"),
        ]
        if scope["method"] == "OPTIONS":
            head = [*allow, (b"access-control-allow-methods", METHODS), (b"access-control-max-age", MAX_AGE)]
            if asked_headers:  # the list, not whatever was asked: a browser sends only what it names
                head.append((b"access-control-allow-headers", ALLOW_HEADERS))
            await _no_content(send, head)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *allow]}
            await send(message)

        await app(scope, receive, with_cors)
