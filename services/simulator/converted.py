"""A chat run streamed through a converter into another API's events: what Ollama's Anthropic and
Responses middlewares do to its chat handler's chunks (`corral.simulator.anthropic`,
`corral.simulator.openai_responses`). The converter turns each chunk into that API's SSE bytes; a
failure before the stream began is that API's error answer, one after it ends the stream silently,
as Ollama's converters do."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aiohttp import web
from corral.protocol.errors import CorralError
from corral.simulator.catalog import LocalModel
from corral.simulator.context import SimContext
from corral.simulator.engine import CONTENT, THINKING, TOOL_CALLS, Engine, Job, Outcome
from corral.simulator.native import fit_context
from corral.simulator.responses import SSE, StreamWriter, finish_stream
from corral.simulator.text import Plan, ToolCall, plan_reply, render_chat, rendered, seed_for
from corral.simulator.wire import sampling_of


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


async def load_only(engine: Engine, job: Job) -> CorralError | None:
    """The chat's reply to no messages: the model loaded (or kept) and nothing run; the error that
    stopped the load, if one did."""
    try:
        runner, _ = await engine.attach(job)
    except CorralError as e:
        return e
    engine.detach(job, runner)
    return None


async def plan_chat(
    ctx: SimContext,
    request: web.Request,
    job: Job,
    model: LocalModel,
    turns: list[tuple[str, str]],
    tools: Sequence[Any],
    opts: dict[str, Any],
    *,
    think: bool,
    fmt: Any = None,
) -> Plan:
    """The chat's prompt as the model's runner gets it (its system prompt first, cut to the
    context) and its reply's plan, as Ollama's chat handler makes them under the middleware."""
    if model.system and turns[0][0] != "system":
        turns.insert(0, ("system", model.system))
    sampling = sampling_of(opts)
    tokens = await rendered(request.content_length, render_chat, turns, tools)
    job.tokens = fit_context(tokens, job.options.num_ctx, opts)
    job.plan = plan_reply(
        seed_for(ctx.config.seed if sampling.seed is None else sampling.seed, job.tokens),
        length=ctx.config.reply_tokens,
        num_predict=sampling.num_predict,
        think=think,
        tools=tools,
        last_user=turns[-1][1],
        last_role=turns[-1][0],
        fmt=fmt,
        stop=sampling.stop,
    )
    return job.plan
