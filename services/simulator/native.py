"""Inference routes: /api/generate, /api/chat, /api/embed, /api/embeddings
(https://github.com/ollama/ollama/blob/main/docs/api.md).

Validation follows Ollama's processing order; errors before the first line are a status +
`{"error": ...}`, after it the stream's last line. Streamed lines are assembled from pre-encoded
pieces (the hot path); final objects are Structs in Go's field order.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec
from aiohttp import web
from corral.protocol.errors import BadRequest, CorralError, ModelNotFound
from corral.simulator.catalog import LocalModel
from corral.simulator.chatplan import fit_context, load_only, plan_chat
from corral.simulator.context import SimContext
from corral.simulator.durations import DurationError, parse_keep_alive
from corral.simulator.engine import CONTENT, THINKING, TOOL_CALLS, Job, Outcome
from corral.simulator.responses import (
    ChatMessageOut,
    ChatResponse,
    EmbedResponse,
    GenerateResponse,
    OutFunction,
    OutToolCall,
    StreamWriter,
    encode,
    error_response,
    json_response,
)
from corral.simulator.scheduler import RunnerOptions
from corral.simulator.text import (
    Plan,
    count_tokens,
    embed,
    l2_normalize,
    plan_reply,
    render_generate,
    rendered,
    seed_for,
    weights_seed,
)
from corral.simulator.wire import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    check_options,
    check_think,
    decode,
    sampling_of,
    think_flag,
)


def keep_alive_of(value: Any) -> float | None:
    try:
        return parse_keep_alive(value)
    except DurationError as e:
        raise BadRequest(str(e)) from None


def find_model(ctx: SimContext, raw: str, not_found: str) -> LocalModel:
    model = ctx.catalog.get(raw)  # InvalidModelName → 400
    if model is None:
        raise ModelNotFound(not_found)
    return model


def runner_options(ctx: SimContext, model: LocalModel, opts: Mapping[str, Any]) -> RunnerOptions:
    num_ctx = opts.get("num_ctx") or ctx.config.default_num_ctx
    num_ctx = max(4, min(num_ctx, model.config.trained_context))
    return RunnerOptions(
        num_ctx=num_ctx,
        num_batch=opts.get("num_batch", 512),
        num_gpu=opts.get("num_gpu", -1),
        main_gpu=opts.get("main_gpu", 0),
        use_mmap=opts.get("use_mmap"),
        num_thread=opts.get("num_thread", 0),
        draft_num_predict=opts.get("draft_num_predict", 0),
    )


def merged_options(model: LocalModel, options: dict[str, Any] | None) -> dict[str, Any]:
    """Request options over the model's Modelfile PARAMETERs."""
    merged = check_options(dict(model.parameters)) if model.parameters else {}
    merged.update(check_options(options))
    return merged


def tool_calls_out(plan: Plan) -> list[OutToolCall]:
    return [
        OutToolCall(id=c.id, function=OutFunction(index=i, name=c.name, arguments=c.arguments))
        for i, c in enumerate(plan.tool_calls)
    ]


def unsupported(ctx: SimContext, message: str) -> BadRequest:
    """Ollama's 400 for a model that lacks what the request needs, counted (`SimStats.unsupported`)."""
    ctx.stats.bump("unsupported")
    return BadRequest(message)


def _check_top_logprobs(n: int | None) -> None:
    if n is not None and not 0 <= n <= 20:
        raise BadRequest("top_logprobs must be between 0 and 20")


class NativeRoutes:
    def __init__(self, ctx: SimContext) -> None:
        self.ctx = ctx

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/embed", self.embed)
        app.router.add_post("/api/embeddings", self.embeddings)

    # ---- /api/generate ------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        ctx = self.ctx
        try:
            req = decode(await request.read(), GenerateRequest)
            keep_alive = keep_alive_of(req.keep_alive)
            _check_top_logprobs(req.top_logprobs)
            raw = req.model or ""
            if not raw:
                raise ModelNotFound("model '' not found")
            model = find_model(ctx, raw, f"model '{raw}' not found")
            prompt = req.prompt or ""
            if not prompt and keep_alive == 0:
                ctx.scheduler.expire_now(model.key)
                return json_response(
                    GenerateResponse(
                        model=raw,
                        created_at=ctx.created_at.now(),
                        response="",
                        done=True,
                        done_reason="unload",
                    )
                )
            if req.raw and (req.template or req.system or req.context):
                raise BadRequest("raw mode does not support template, system, or context")
            caps = model.config.capabilities
            if "completion" not in caps:
                raise unsupported(ctx, f'"{raw}" does not support generate')
            if req.suffix and "insert" not in caps:
                raise unsupported(ctx, f"{model.name.canonical} does not support insert")
            check_think(req.think)
            if req.think not in (None, False) and "thinking" not in caps and think_flag(req.think, False):
                raise unsupported(ctx, f'"{raw}" does not support thinking')
            opts = merged_options(model, req.options)
            ropts = runner_options(ctx, model, opts)
        except CorralError as e:
            return error_response(e.status, e.message)
        job = Job(model=model, options=ropts, keep_alive=keep_alive, tokens=[], t0=t0)
        if not prompt:
            return await self._load_only(job, GenerateResponse, raw, response="")
        sampling = sampling_of(opts)
        system = req.system if req.system is not None else model.system
        size = request.content_length
        tokens = await rendered(size, render_generate, prompt, system, req.context or (), bool(req.raw))
        job.tokens = fit_context(tokens, ropts.num_ctx, opts)
        seed = ctx.config.seed if sampling.seed is None else sampling.seed
        plan = job.plan = plan_reply(
            seed_for(seed, job.tokens),
            length=self.ctx.config.reply_tokens,
            num_predict=sampling.num_predict,
            think=think_flag(req.think, "thinking" in caps),
            fmt=req.format,
            stop=sampling.stop,
        )
        keep_context = not req.raw

        def final(out: Outcome, response: str, thinking: str) -> GenerateResponse:
            return GenerateResponse(
                model=raw,
                created_at=ctx.created_at.now(),
                response=response,
                thinking=thinking,
                done=True,
                done_reason=plan.done_reason,
                context=out.context if keep_context else None,
                total_duration=out.total_ns,
                load_duration=out.load_ns,
                prompt_eval_count=out.prompt_eval_count,
                prompt_eval_duration=out.prompt_eval_ns,
                eval_count=out.eval_count,
                eval_duration=out.eval_ns,
                tool_calls=tool_calls_out(plan) or None,
            )

        if req.stream is False:
            try:
                out = await ctx.engine.run(job, None)
            except CorralError as e:
                return error_response(e.status, e.message)
            return json_response(final(out, "".join(plan.content), "".join(plan.thinking)))

        writer = StreamWriter(request)
        head = b'{"model":' + encode(raw) + b',"created_at":"'
        stamp = ctx.created_at.now

        async def emit(kind: int, piece: str) -> None:
            if kind == CONTENT:
                await writer.write(
                    b"".join((head, stamp().encode(), b'","response":', encode(piece), b',"done":false}\n'))
                )
            elif kind == THINKING:
                await writer.write(
                    b"".join(
                        (
                            head,
                            stamp().encode(),
                            b'","response":"","thinking":',
                            encode(piece),
                            b',"done":false}\n',
                        )
                    )
                )

        return await self._stream(writer, job, emit, lambda out: final(out, "", ""))

    async def _stream(
        self,
        writer: StreamWriter,
        job: Job,
        emit: Any,
        final: Any,
    ) -> web.StreamResponse:
        try:
            out = await self.ctx.engine.run(job, emit)
            await writer.write(encode(final(out)) + b"\n")
        except CorralError as e:
            if not writer.started:
                return error_response(e.status, e.message)
            await writer.write(encode({"error": e.message}) + b"\n")
        except ConnectionError:
            return writer.response or web.Response(status=499)
        try:
            return await writer.finish()
        except ConnectionError:
            return writer.response or web.Response(status=499)

    async def _load_only(self, job: Job, shape: Any, raw: str, **fields: Any) -> web.StreamResponse:
        ctx = self.ctx
        if (e := await load_only(ctx.engine, job)) is not None:
            return error_response(e.status, e.message)
        return json_response(
            shape(model=raw, created_at=ctx.created_at.now(), done=True, done_reason="load", **fields)
        )

    # ---- /api/chat ----------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        ctx = self.ctx
        try:
            req = decode(await request.read(), ChatRequest)
            keep_alive = keep_alive_of(req.keep_alive)
            _check_top_logprobs(req.top_logprobs)
            raw = req.model or ""
            if not raw:
                raise BadRequest("model is required")
            model = find_model(ctx, raw, f"model '{raw}' not found")
            messages = req.messages or []
            if not messages and keep_alive == 0:
                ctx.scheduler.expire_now(model.key)
                return json_response(
                    ChatResponse(
                        model=raw,
                        created_at=ctx.created_at.now(),
                        message=ChatMessageOut(role="assistant", content=""),
                        done=True,
                        done_reason="unload",
                    )
                )
            caps = model.config.capabilities
            if "completion" not in caps:
                raise unsupported(ctx, f'"{raw}" does not support chat')
            if req.tools and "tools" not in caps:
                raise unsupported(ctx, f"{model.name.canonical} does not support tools")
            check_think(req.think)
            if req.think not in (None, False) and "thinking" not in caps and think_flag(req.think, False):
                raise unsupported(ctx, f'"{raw}" does not support thinking')
            opts = merged_options(model, req.options)
            ropts = runner_options(ctx, model, opts)
        except CorralError as e:
            return error_response(e.status, e.message)
        job = Job(model=model, options=ropts, keep_alive=keep_alive, tokens=[], t0=t0)
        if not messages:
            return await self._load_only(
                job, ChatResponse, raw, message=ChatMessageOut(role="assistant", content="")
            )
        return await self.run_chat(request, req, raw, model, job, opts)

    async def run_chat(
        self,
        request: web.Request,
        req: ChatRequest,
        raw: str,
        model: LocalModel,
        job: Job,
        opts: dict[str, Any],
    ) -> web.StreamResponse:
        ctx = self.ctx
        turns = [((m.role or "user").lower(), m.content or "") for m in req.messages or []]
        think = think_flag(req.think, "thinking" in model.config.capabilities)
        plan = await plan_chat(
            ctx, request, job, model, turns, req.tools or (), opts, think=think, fmt=req.format
        )

        def final(out: Outcome, message: ChatMessageOut) -> ChatResponse:
            return ChatResponse(
                model=raw,
                created_at=ctx.created_at.now(),
                message=message,
                done=True,
                done_reason=plan.done_reason,
                total_duration=out.total_ns,
                load_duration=out.load_ns,
                prompt_eval_count=out.prompt_eval_count,
                prompt_eval_duration=out.prompt_eval_ns,
                eval_count=out.eval_count,
                eval_duration=out.eval_ns,
            )

        if req.stream is False:
            try:
                out = await ctx.engine.run(job, None)
            except CorralError as e:
                return error_response(e.status, e.message)
            msg = ChatMessageOut(
                role="assistant",
                content="".join(plan.content),
                thinking="".join(plan.thinking),
                tool_calls=tool_calls_out(plan) or None,
            )
            return json_response(final(out, msg))

        writer = StreamWriter(request)
        head = b'{"model":' + encode(raw) + b',"created_at":"'
        stamp = ctx.created_at.now

        async def emit(kind: int, piece: str) -> None:
            if kind == CONTENT:
                line = b"".join(
                    (
                        head,
                        stamp().encode(),
                        b'","message":{"role":"assistant","content":',
                        encode(piece),
                        b'},"done":false}\n',
                    )
                )
            elif kind == THINKING:
                line = b"".join(
                    (
                        head,
                        stamp().encode(),
                        b'","message":{"role":"assistant","content":"","thinking":',
                        encode(piece),
                        b'},"done":false}\n',
                    )
                )
            elif kind == TOOL_CALLS:
                chunk = ChatResponse(
                    model=raw,
                    created_at=stamp(),
                    message=ChatMessageOut(role="assistant", content="", tool_calls=tool_calls_out(plan)),
                    done=False,
                )
                line = encode(chunk) + b"\n"
            else:
                return
            await writer.write(line)

        return await self._stream(
            writer, job, emit, lambda out: final(out, ChatMessageOut(role="assistant", content=""))
        )

    # ---- /api/embed, /api/embeddings ----------------------------------------------------------

    async def embed(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        ctx = self.ctx
        try:
            req = decode(await request.read(), EmbedRequest)
            keep_alive = keep_alive_of(req.keep_alive)
            raw = req.model or ""
            if not raw:
                raise ModelNotFound("model '' not found")
            inputs = embed_inputs(req.input)
            model = find_model(ctx, raw, f'model "{raw}" not found, try pulling it first')
            opts = merged_options(model, req.options)
            ropts = runner_options(ctx, model, opts)
            counts = [count_tokens(s) for s in inputs]
            if req.truncate is False and any(n > ropts.num_ctx for n in counts):
                raise BadRequest("the input length exceeds the context length")
        except CorralError as e:
            return error_response(e.status, e.message)
        job = Job(model=model, options=ropts, keep_alive=keep_alive, tokens=[], t0=t0)
        if not inputs:
            try:
                runner, _ = await ctx.engine.attach(job)
            except CorralError as e:
                return error_response(e.status, e.message)
            ctx.engine.detach(job, runner)
            return json_response(EmbedResponse(model=raw, embeddings=[]))
        total = sum(min(n, ropts.num_ctx) for n in counts)
        try:
            out, _ = await ctx.engine.embed(job, total)
        except CorralError as e:
            return error_response(e.status, e.message)
        dim = model.config.embedding_dim
        vectors = [embed(s, dim, weights_seed(model.config.name)) for s in inputs]
        if req.dimensions and 0 < req.dimensions < dim:
            vectors = [l2_normalize(v[: req.dimensions]) for v in vectors]
        return json_response(
            EmbedResponse(
                model=raw,
                embeddings=vectors,
                total_duration=out.total_ns,
                load_duration=out.load_ns,
                prompt_eval_count=out.prompt_eval_count,
            )
        )

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        ctx = self.ctx
        try:
            req = decode(await request.read(), EmbeddingsRequest)
            keep_alive = keep_alive_of(req.keep_alive)
            raw = req.model or ""
            if not raw:
                raise BadRequest("model is required")
            model = find_model(ctx, raw, f'model "{raw}" not found, try pulling it first')
            ropts = runner_options(ctx, model, merged_options(model, req.options))
        except CorralError as e:
            return error_response(e.status, e.message)
        job = Job(model=model, options=ropts, keep_alive=keep_alive, tokens=[], t0=t0)
        prompt = req.prompt or ""
        try:
            if not prompt:
                runner, _ = await ctx.engine.attach(job)
                ctx.engine.detach(job, runner)
                return json_response(b'{"embedding":[]}')
            await ctx.engine.embed(job, count_tokens(prompt))
        except CorralError as e:
            return error_response(e.status, e.message)
        vec = [
            v * 4.0
            for v in embed(
                prompt, model.config.embedding_dim, weights_seed(model.config.name), normalize=False
            )
        ]
        return json_response(msgspec.json.encode({"embedding": vec}))


def embed_inputs(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise BadRequest("invalid input type")
