"""The only place Corral errors become HTTP: Ollama's ``{"error": ...}`` or /v1's error object."""

from __future__ import annotations

import msgspec
from corral.gateway.asgi import Send
from corral.protocol.errors import CorralError, ModelNotFound, not_found_message
from starlette.responses import Response

JSON = "application/json; charset=utf-8"
# gin's plain-text answers outside Ollama's handlers
NOT_FOUND = "404 page not found"
METHOD_NOT_ALLOWED = "405 method not allowed"
# a body nested deeper than the decoder goes (about a thousand levels): Go's words for its own bound
TOO_DEEP = "exceeded max depth"

_enc = msgspec.json.Encoder()


class _OpenAIError(msgspec.Struct):
    message: str
    type: str
    param: None = None
    code: None = None


class _OpenAIBody(msgspec.Struct):
    error: _OpenAIError


class _NativeBody(msgspec.Struct):
    error: str


def native_body(message: str) -> bytes:
    return _enc.encode(_NativeBody(message))


def openai_body(status: int, message: str) -> bytes:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }.get(status, "api_error")
    return _enc.encode(_OpenAIBody(_OpenAIError(message, kind)))


def error_response(
    err: CorralError, *, openai: bool, endpoint: str = "", raw_model: str = ""
) -> tuple[int, bytes]:
    message = err.message
    if isinstance(err, ModelNotFound) and raw_model:
        message = not_found_message(endpoint, raw_model, err.message, err.vendor)
    status = err.status
    return status, (openai_body(status, message) if openai else native_body(message))


def json_error(status: int, message: str, *, openai: bool = False) -> Response:
    """A route's error answer in the API's shape: Ollama's ``{"error": ...}``, or /v1's object."""
    body = openai_body(status, message) if openai else native_body(message)
    return Response(body, status_code=status, media_type=JSON)


async def refuse(
    send: Send,
    status: int,
    message: str,
    *,
    openai: bool,
    close: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer a request refused before it reached a route (the edge's bounds, a key's check) in
    the API's own error shape. ``close``: the request's body may still be on its way unread, so the
    connection must not be read for a next request."""
    body = openai_body(status, message) if openai else native_body(message)
    head = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode()), *(headers or [])]
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def plain(
    send: Send, status: int, text: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer in gin's plain text (``405 method not allowed``), as Ollama does outside its handlers."""
    head = [
        (b"content-type", b"text/plain"),
        (b"content-length", str(len(text)).encode()),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": text})
