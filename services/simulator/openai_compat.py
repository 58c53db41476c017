"""OpenAI-compatible routes under /v1
(https://github.com/ollama/ollama/blob/main/docs/openai.md): thin translations onto the same engine.

Errors use OpenAI's shape ``{"error":{"message","type","param","code"}}`` with the native status;
`stream` defaults to false; streams are SSE ending in ``data: [DONE]`` (HEAD chunking: role only
in the first delta, a separate finish chunk, then the optional usage chunk).
"""

from __future__ import annotations

import base64
import random
import struct
import time
from typing import Any, Final

import msgspec
from aiohttp import web
from corral.protocol.errors import BadRequest, CorralError, InvalidModelName, ModelNotFound
from corral.protocol.names import parse_name
from corral.simulator.catalog import LocalModel
from corral.simulator.context import SimContext
from corral.simulator.engine import CONTENT, THINKING, TOOL_CALLS, Job, Outcome
from corral.simulator.native import find_model, merged_options, runner_options, unsupported
from corral.simulator.responses import StreamWriter, encode, json_response
from corral.simulator.text import (
    Plan,
    count_tokens,
    embed,
    l2_normalize,
    plan_reply,
    render_chat,
    render_generate,
    rendered,
    seed_for,
    weights_seed,
)
from corral.simulator.wire import decode_object, think_flag

SSE: Final = "text/event-stream"
_TYPES: Final = {400: "invalid_request_error", 404: "not_found_error"}
EFFORT: Final[dict[str, bool | str]] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
    "xhigh": "max",
    "ultra": "max",
}


def openai_error(status: int, message: str) -> web.Response:
    body = {
        "error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": None, "code": None}
    }
    return json_response(body, status)


def _finish(plan: Plan) -> str:
    if plan.done_reason == "stop" and plan.tool_calls:
        return "tool_calls"
    return plan.done_reason


def _tool_calls(plan: Plan) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "index": i,
            "type": "function",
            "function": {"name": c.name, "arguments": msgspec.json.encode(c.arguments).decode()},
        }
        for i, c in enumerate(plan.tool_calls)
    ]


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise BadRequest("invalid message content type")
            if part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise BadRequest(
                        "image URLs are not currently supported, please use base64 encoded data instead"
                    )
        return "".join(parts)
    raise BadRequest("invalid message content type")


# the typed fields of Ollama's request structs (openai/openai.go): a value of another JSON type
# fails Go's decoding, a 400 before anything runs
_FLOATS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
_INTS = ("max_tokens", "max_completion_tokens", "seed")
# the request fields read here, of the OpenAI request structs Ollama's middleware decodes
_FIELDS = frozenset(
    {
        *_FLOATS,
        *_INTS,
        *("model", "messages", "prompt", "input", "stream", "stream_options", "stop", "tools"),
        *("response_format", "reasoning_effort", "reasoning", "encoding_format", "dimensions"),
    }
)


def _json_kind(value: Any) -> str:
    """How Go's encoding/json names a JSON value it cannot unmarshal."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _check_types(body: dict[str, Any], struct: str, floats: str = "float64") -> None:
    """Go's decoding of ``body`` into Ollama's ``struct``: the error it gives for a wrong type."""
    for name, wanted in [*((f, floats) for f in _FLOATS), *((f, "int") for f in _INTS), ("stream", "bool")]:
        value = body.get(name)
        if value is None:
            continue
        ok = {
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
        }.get(wanted, isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            raise BadRequest(
                f"json: cannot unmarshal {_json_kind(value)} into Go struct field {struct}.{name} of type {wanted}"
            )


def _options(body: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        opts["num_predict"] = max_tokens
    if body.get("seed") is not None:
        opts["seed"] = body["seed"]
    stop = body.get("stop")
    if stop is not None:
        opts["stop"] = [stop] if isinstance(stop, str) else stop
    opts["temperature"] = body.get("temperature") if body.get("temperature") is not None else 1.0
    opts["top_p"] = body.get("top_p") or 1.0
    return opts


class OpenAIRoutes:
    def __init__(self, ctx: SimContext) -> None:
        self.ctx = ctx
        self.rng = random.Random(ctx.config.seed)

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model}", self.model)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        return decode_object(await request.read(), _FIELDS)

    def _model(self, raw: Any, *, embed: bool = False) -> tuple[str, LocalModel]:
        if not isinstance(raw, str) or not raw:
            raise BadRequest("model is required")
        # embeddings go through Ollama's embed handler, which words it so
        missing = f'model "{raw}" not found, try pulling it first' if embed else f"model '{raw}' not found"
        return raw, find_model(self.ctx, raw, missing)

    # ---- chat ---------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        ctx = self.ctx
        try:
            body = await self._body(request)
            _check_types(body, "ChatCompletionRequest")
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise BadRequest("invalid request body")
            if not messages:
                raise BadRequest("[] is too short - 'messages'")
            raw, model = self._model(body.get("model"))
            turns = []
            for m in messages:
                if not isinstance(m, dict):
                    raise BadRequest("invalid message format")
                turns.append((str(m.get("role", "user")).lower(), _text_of(m.get("content"))))
            tools = body.get("tools") or []
            caps = model.config.capabilities
            if "completion" not in caps:
                raise BadRequest(f'"{raw}" does not support chat')
            if tools and "tools" not in caps:
                raise BadRequest(f"{model.name.canonical} does not support tools")
            effort = body.get("reasoning_effort")
            if effort is None and isinstance(body.get("reasoning"), dict):
                effort = body["reasoning"].get("effort")
            think: bool | str | None = None
            if effort is not None:
                if effort not in EFFORT:
                    raise BadRequest(
                        f'invalid reasoning value: \'{effort}\' (must be "high", "medium", "low", or "none")'
                    )
                think = EFFORT[effort]
                if think and "thinking" not in caps:
                    raise BadRequest(f'"{raw}" does not support thinking')
            opts = merged_options(model, _options(body))
            fmt = _format(body.get("response_format"))
        except CorralError as e:
            return openai_error(e.status, e.message)
        if model.system and turns[0][0] != "system":
            turns.insert(0, ("system", model.system))
        tokens = await rendered(request.content_length, render_chat, turns, tools)
        seed = opts.get("seed", ctx.config.seed)
        plan = plan_reply(
            seed_for(seed, tokens),
            length=self.ctx.config.reply_tokens,
            num_predict=opts.get("num_predict", -1),
            think=think_flag(think, "thinking" in caps),
            tools=tools,
            last_user=turns[-1][1],
            last_role=turns[-1][0],
            fmt=fmt,
            stop=opts.get("stop", []),
        )
        job = Job(
            model=model,
            options=runner_options(ctx, model, opts),
            keep_alive=None,
            tokens=tokens,
            plan=plan,
            t0=t0,
        )
        ident = f"chatcmpl-{self.rng.randrange(999)}"
        created = int(time.time())
        stream = body.get("stream") is True
        if not stream:
            try:
                out = await ctx.engine.run(job, None)
            except CorralError as e:
                return openai_error(e.status, e.message)
            message: dict[str, Any] = {"role": "assistant", "content": "".join(plan.content)}
            if plan.thinking:
                message["reasoning"] = "".join(plan.thinking)
            if plan.tool_calls:
                message["tool_calls"] = _tool_calls(plan)
            return json_response(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": raw,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"index": 0, "message": message, "finish_reason": _finish(plan)}],
                    "usage": _usage(out),
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head = (
            b'data: {"id":'
            + encode(ident)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + encode(raw)
            + b',"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":'
        )
        tail = b',"finish_reason":null}]}\n\n'
        writer = StreamWriter(request, SSE)
        first = [True]

        async def emit(kind: int, piece: str) -> None:
            delta: dict[str, Any] = {"role": "assistant"} if first[0] else {}
            first[0] = False
            if kind == CONTENT:
                delta["content"] = piece
            elif kind == THINKING:
                delta["reasoning"] = piece
            elif kind == TOOL_CALLS:
                delta["tool_calls"] = _tool_calls(plan)
            await writer.write(head + encode(delta) + tail)

        def final(out: Outcome) -> bytes:
            done = head + b'{},"finish_reason":' + encode(_finish(plan)) + b"}]}\n\n"
            if include_usage:
                usage = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": raw,
                    "system_fingerprint": "fp_ollama",
                    "choices": [],
                    "usage": _usage(out),
                }
                done += b"data: " + encode(usage) + b"\n\n"
            return done + b"data: [DONE]\n\n"

        return await self._stream(writer, job, emit, final, head + b'{"content":""}' + tail)

    async def _stream(
        self, writer: StreamWriter, job: Job, emit: Any, final: Any, error_chunk: bytes
    ) -> web.StreamResponse:
        try:
            out = await self.ctx.engine.run(job, emit)
            await writer.write(final(out))
        except CorralError as e:
            if not writer.started:
                return openai_error(e.status, e.message)
            await writer.write(error_chunk)
        except ConnectionError:
            return writer.response or web.Response(status=499)
        try:
            return await writer.finish()
        except ConnectionError:
            return writer.response or web.Response(status=499)

    # ---- completions --------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        ctx = self.ctx
        try:
            body = await self._body(request)
            _check_types(body, "CompletionRequest", floats="float32")
            prompt = body.get("prompt", "")
            if not isinstance(prompt, str):
                raise BadRequest("invalid type for 'prompt' field: only string is supported")
            raw, model = self._model(body.get("model"))
            if "completion" not in model.config.capabilities:
                raise BadRequest(f'"{raw}" does not support generate')
            if body.get("suffix") and "insert" not in model.config.capabilities:  # Ollama's native check
                raise unsupported(ctx, f"{model.name.canonical} does not support insert")
            opts = merged_options(model, _options(body))
        except CorralError as e:
            return openai_error(e.status, e.message)
        ident = f"cmpl-{self.rng.randrange(999)}"
        created = int(time.time())
        job = Job(model=model, options=runner_options(ctx, model, opts), keep_alive=None, tokens=[], t0=t0)

        def response(text: str, finish: str, out: Outcome | None) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": raw,
                "system_fingerprint": "fp_ollama",
                "choices": [{"text": text, "index": 0, "finish_reason": finish}],
                "usage": _usage(out),
            }

        if not prompt:
            try:
                runner, _ = await ctx.engine.attach(job)
            except CorralError as e:
                return openai_error(e.status, e.message)
            ctx.engine.detach(job, runner)
            return json_response(response("", "load", None))
        job.tokens = await rendered(request.content_length, render_generate, prompt, model.system)
        plan = job.plan = plan_reply(
            seed_for(opts.get("seed", ctx.config.seed), job.tokens),
            length=self.ctx.config.reply_tokens,
            num_predict=opts.get("num_predict", -1),
            stop=opts.get("stop", []),
        )
        if body.get("stream") is not True:
            try:
                out = await ctx.engine.run(job, None)
            except CorralError as e:
                return openai_error(e.status, e.message)
            return json_response(response("".join(plan.content), plan.done_reason, out))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head = (
            b'data: {"id":'
            + encode(ident)
            + b',"object":"text_completion","created":'
            + str(created).encode()
            + b',"model":'
            + encode(raw)
            + b',"system_fingerprint":"fp_ollama","choices":[{"text":'
        )
        writer = StreamWriter(request, SSE)

        async def emit(kind: int, piece: str) -> None:
            if kind == CONTENT:
                await writer.write(head + encode(piece) + b',"index":0,"finish_reason":null}]}\n\n')

        def final(out: Outcome) -> bytes:
            done = head + b'"","index":0,"finish_reason":' + encode(plan.done_reason) + b"}]}\n\n"
            if include_usage:
                usage = response("", "", out)
                usage["choices"] = []
                done += b"data: " + encode(usage) + b"\n\n"
            return done + b"data: [DONE]\n\n"

        return await self._stream(
            writer, job, emit, final, head + b'"","index":0,"finish_reason":null}]}\n\n'
        )

    # ---- embeddings ---------------------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        ctx = self.ctx
        try:
            body = await self._body(request)
            inp = body.get("input")
            if inp == "":
                inp = [""]
            if isinstance(inp, str):
                inp = [inp]
            if not isinstance(inp, list) or not inp or not all(isinstance(s, str) for s in inp):
                raise BadRequest("invalid input")
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise BadRequest(
                    f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64']."
                )
            raw, model = self._model(body.get("model"), embed=True)
            opts = merged_options(model, {})
        except CorralError as e:
            return openai_error(e.status, e.message)
        job = Job(model=model, options=runner_options(ctx, model, opts), keep_alive=None, tokens=[], t0=t0)
        n = sum(count_tokens(s) for s in inp)
        try:
            await ctx.engine.embed(job, n)
        except CorralError as e:
            return openai_error(e.status, e.message)
        dim = model.config.embedding_dim
        dims = body.get("dimensions")
        data = []
        for i, s in enumerate(inp):
            vec = embed(s, dim, weights_seed(model.config.name))
            if isinstance(dims, int) and 0 < dims < dim:
                vec = l2_normalize(vec[:dims])
            value: Any = vec
            if fmt == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "embedding": value, "index": i})
        return json_response(
            {"object": "list", "data": data, "model": raw, "usage": {"prompt_tokens": n, "total_tokens": n}}
        )

    # ---- models -------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        data = [_model_entry(m.display, m) for m in self.ctx.catalog.listing()]
        return json_response({"object": "list", "data": data or None})

    async def model(self, request: web.Request) -> web.Response:
        raw = request.match_info["model"]
        try:
            m = self.ctx.catalog.models.get(parse_name(raw).key)
        except InvalidModelName:
            m = None
        if m is None:
            return openai_error(404, ModelNotFound(f"model '{raw}' not found").message)
        return json_response(_model_entry(raw, m))


def _model_entry(ident: str, m: LocalModel) -> dict[str, Any]:
    return {"id": ident, "object": "model", "created": int(m.modified_at), "owned_by": m.name.namespace}


def _usage(out: Outcome | None) -> dict[str, int]:
    p = out.prompt_eval_count if out else 0
    c = out.eval_count if out else 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _format(rf: Any) -> Any:
    if not isinstance(rf, dict):
        return None
    if rf.get("type") == "json_object":
        return "json"
    if rf.get("type") == "json_schema":
        schema = rf.get("json_schema")
        return schema.get("schema") if isinstance(schema, dict) else None
    return None
