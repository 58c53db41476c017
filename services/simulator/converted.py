"""A chat run streamed through a converter into another API's events: what Ollama's Anthropic and
Responses middlewares do to its chat handler's chunks (`corral.simulator.anthropic`,
`corral.simulator.openai_responses`). The converter turns each chunk into that API's SSE bytes; a
failure before the stream began is that API's error answer, one after it ends the stream silently,
as Ollama's converters do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aiohttp import web
from corral.protocol.errors import CorralError
from corral.simulator.engine import CONTENT, THINKING, TOOL_CALLS, Engine, Job, Outcome
from corral.simulator.responses import SSE, StreamWriter, finish_stream
from corral.simulator.text import ToolCall


class Converter(Protocol):
    def think(self, piece: str) -> bytes: ...

    def say(self, piece: str) -> bytes: ...

    def call(self, calls: list[ToolCall]) -> bytes: ...


async def stream_converted(
    request: web.Request,
    engine: Engine,
    job: Job,
    events: Converter,
    *,
    failed: Callable[[CorralError], web.StreamResponse],
    done: Callable[[Outcome], bytes],
) -> web.StreamResponse:
    """Run ``job`` (its plan made), its chunks as ``events`` say them; ``done``: the last events."""
    writer = StreamWriter(request, SSE)
    calls = job.plan.tool_calls if job.plan is not None else []

    async def emit(kind: int, piece: str) -> None:
        if kind == THINKING:
            await writer.write(events.think(piece))
        elif kind == CONTENT:
            await writer.write(events.say(piece))
        elif kind == TOOL_CALLS:
            await writer.write(events.call(calls))

    try:
        out = await engine.run(job, emit)
    except CorralError as e:
        if not writer.started:
            return failed(e)
        return await finish_stream(writer, b"")  # Ollama's converter has nothing to say of it
    except ConnectionError:
        return writer.response or web.Response(status=499)
    return await finish_stream(writer, done(out))
