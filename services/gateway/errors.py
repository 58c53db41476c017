"""The only place Corral errors become HTTP: Ollama's ``{"error": ...}`` or /v1's error object."""

from __future__ import annotations

import msgspec
from corral.protocol.errors import CorralError, ModelNotFound, not_found_message

JSON = "application/json; charset=utf-8"

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
        message = not_found_message(endpoint, raw_model, err.message)
    status = err.status
    return status, (openai_body(status, message) if openai else native_body(message))
