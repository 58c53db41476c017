"""HTTP framing shared by all routes: JSON bodies without a trailing newline, `{"error": ...}`,
lazily-started NDJSON streams (headers go out with the first line, as in Go), response Structs
whose field order matches Ollama's (Go's declaration order), zero metrics omitted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec
from aiohttp import web

NDJSON: Final = "application/x-ndjson"

encode = msgspec.json.Encoder().encode


def json_response(obj: Any, status: int = 200) -> web.Response:
    body = obj if isinstance(obj, bytes) else encode(obj)
    return web.Response(body=body, status=status, content_type="application/json", charset="utf-8")


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


def text_response(status: int, text: str) -> web.Response:
    return web.Response(body=text.encode(), status=status, headers={"Content-Type": "text/plain"})


def empty_response(status: int = 200) -> web.Response:
    return web.Response(status=status)


class StreamWriter:
    """One streamed response; the status line and headers are sent with the first write."""

    __slots__ = ("content_type", "request", "response")

    def __init__(self, request: web.Request, content_type: str = NDJSON) -> None:
        self.request = request
        self.content_type = content_type
        self.response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.response is not None

    async def write(self, data: bytes) -> None:
        resp = self.response
        if resp is None:
            resp = self.response = web.StreamResponse(headers={"Content-Type": self.content_type})
            await resp.prepare(self.request)
        await resp.write(data)

    async def finish(self) -> web.StreamResponse:
        if self.response is None:
            self.response = web.StreamResponse(headers={"Content-Type": self.content_type})
            await self.response.prepare(self.request)
        await self.response.write_eof()
        return self.response


# ---- response shapes (field order = Go's) -------------------------------------------------------


class OutFunction(msgspec.Struct):
    index: int
    name: str
    arguments: dict[str, Any]


class OutToolCall(msgspec.Struct):
    id: str
    function: OutFunction


class GenerateResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: str
    created_at: str
    response: str
    thinking: str = ""
    done: bool
    done_reason: str = ""
    context: list[int] | None = None
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    tool_calls: list[OutToolCall] | None = None


class ChatMessageOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str
    content: str
    thinking: str = ""
    tool_calls: list[OutToolCall] | None = None


class ChatResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: str
    created_at: str
    message: ChatMessageOut
    done: bool
    done_reason: str = ""
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0


class EmbedResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: str
    embeddings: list[list[float]]
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0


class Details(msgspec.Struct):
    parent_model: str
    format: str
    family: str
    families: list[str] | None
    parameter_size: str
    quantization_level: str


class TagModel(msgspec.Struct):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details
    capabilities: list[str]


class PsModel(msgspec.Struct):
    name: str
    model: str
    size: int
    digest: str
    details: Details
    expires_at: str
    size_vram: int
    context_length: int


class Progress(msgspec.Struct, omit_defaults=True):
    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0


SSE: Final = "text/event-stream"


def sse_event(event: str, data: Any, enc: Callable[[Any], bytes] = encode) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + enc(data) + b"\n\n"


async def finish_stream(writer: StreamWriter, data: bytes) -> web.StreamResponse:
    """Write the stream's last ``data`` and end it; a client gone by then is a 499 in the log."""
    try:
        if data:
            await writer.write(data)
        return await writer.finish()
    except ConnectionError:
        return writer.response or web.Response(status=499)
