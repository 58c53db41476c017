"""The only place Corral errors become HTTP, in the shape of the API a request speaks (`Dialect`):
Ollama's ``{"error": ...}``, OpenAI's error object on /v1, Anthropic's on /v1/messages."""

from __future__ import annotations

import secrets
from typing import Literal

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


# The API a request speaks, by its path: Ollama's own, its OpenAI-compatible routes (/v1), or its
# Anthropic-compatible one (/v1/messages, https://docs.ollama.com/api/anthropic-compatibility)
Dialect = Literal["ollama", "openai", "anthropic"]
ANTHROPIC_PATH = "/v1/messages"


def dialect(path: str) -> Dialect:
    if path == ANTHROPIC_PATH:
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "ollama"


class _AnthropicError(msgspec.Struct):
    type: str
    message: str


class _AnthropicBody(msgspec.Struct, kw_only=True):
    type: str = "error"
    error: _AnthropicError
    request_id: str


def native_body(message: str) -> bytes:
    return _enc.encode(_NativeBody(message))


# an error's type by its status, as both OpenAI's and Anthropic's APIs name them; else "api_error"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def openai_body(status: int, message: str) -> bytes:
    return _enc.encode(_OpenAIBody(_OpenAIError(message, _ERROR_TYPES.get(status, "api_error"))))


def anthropic_body(status: int, message: str) -> bytes:
    kind = "overloaded_error" if status in (503, 529) else _ERROR_TYPES.get(status, "api_error")
    return _enc.encode(
        _AnthropicBody(error=_AnthropicError(kind, message), request_id=f"req_{secrets.token_hex(12)}")
    )


def error_body(api: Dialect, status: int, message: str) -> bytes:
    if api == "openai":
        return openai_body(status, message)
    if api == "anthropic":
        return anthropic_body(status, message)
    return native_body(message)


def error_response(
    err: CorralError, *, api: Dialect, endpoint: str = "", raw_model: str = ""
) -> tuple[int, bytes]:
    message = err.message
    if isinstance(err, ModelNotFound) and raw_model:
        message = not_found_message(endpoint, raw_model, err.message, err.vendor)
    return err.status, error_body(api, err.status, message)


def json_error(status: int, message: str, *, api: Dialect = "ollama") -> Response:
    """A route's error answer in the API's shape (`error_body`)."""
    return Response(error_body(api, status, message), status_code=status, media_type=JSON)


async def refuse(
    send: Send,
    status: int,
    message: str,
    *,
    api: Dialect,
    close: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer a request refused before it reached a route (the edge's bounds, a key's check) in
    the API's own error shape. ``close``: the request's body may still be on its way unread, so the
    connection must not be read for a next request."""
    body = error_body(api, status, message)
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
