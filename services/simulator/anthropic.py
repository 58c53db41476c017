"""Anthropic Messages compatibility, ``POST /v1/messages``
(https://docs.ollama.com/api/anthropic-compatibility): Ollama's middleware turns the request into
an ``/api/chat`` request and the chat's replies into Anthropic's shapes; here the same translation
runs onto the simulated chat path (its model lookup, capabilities, options, thinking and tools).

Validation, each a 400: Go's decoding errors, ``model is required``, ``max_tokens is required and
must be positive``, ``messages is required``, then the blocks' (images: base64 sources only).
``max_tokens`` is ``num_predict``, ``stop_sequences`` ``stop``; ``thinking`` (else
``output_config.effort``) is ``think``, dropped for a model that cannot think (Ollama relaxes the
check here). Errors: ``{"type":"error","error":{"type","message"},"request_id"}``. Streams are SSE
(``event: <type>\ndata: <json>\n\n``): ``message_start``, each block's ``content_block_start`` /
``_delta`` / ``_stop`` (thinking, text, then each tool call's whole input as one
``input_json_delta``), ``message_delta`` (stop reason, usage), ``message_stop``; no pings.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from corral.protocol.errors import BadRequest, CorralError
from corral.protocol.gojson import base64_error
from corral.protocol.gojson import kind as go_kind
from corral.simulator.chatplan import load_only, plan_chat
from corral.simulator.context import SimContext
from corral.simulator.converted import stream_converted
from corral.simulator.engine import Job
from corral.simulator.native import find_model, merged_options, runner_options, unsupported
from corral.simulator.responses import SSE, StreamWriter, encode, finish_stream, json_response, sse_event
from corral.simulator.text import Plan, ToolCall
from corral.simulator.wire import check_fields, go_body, think_flag

_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
# anthropic.MessagesRequest: each field's Go type, for Go's decoding errors
_SPEC: Final = dict(
    f.split(":", 1)
    for f in (
        "model:string max_tokens:int messages:[]anthropic.MessageParam stream:bool temperature:float64"
        " top_p:float64 top_k:int stop_sequences:[]string tools:[]anthropic.Tool"
        " metadata:anthropic.Metadata tool_choice:anthropic.ToolChoice thinking:anthropic.ThinkingConfig"
        " output_config:anthropic.OutputConfig"
    ).split()
)
_FIELDS: Final = frozenset({*_SPEC, "system"})
_EFFORTS: Final = frozenset({"low", "medium", "high", "max"})


def blen(text: str) -> int:
    """Go's ``len``: UTF-8 bytes."""
    return len(text.encode("utf-8", "surrogatepass"))


def anthropic_error(status: int, message: str, request_id: str) -> web.Response:
    err = {"type": _TYPES.get(status, "api_error"), "message": message}
    return json_response({"type": "error", "error": err, "request_id": request_id}, status)


def _blocks(content: Any) -> list[Any]:
    """A message's content as Ollama's ``MessageParam`` reads it: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:  # a missing `content`: Go's decoder is handed nothing
        raise BadRequest("unexpected end of JSON input")
    if not isinstance(content, list):
        raise BadRequest(
            f"json: cannot unmarshal {go_kind(content)} into Go value of type []anthropic.ContentBlock"
        )
    return content


def _str(block: Mapping[str, Any], key: str) -> str:
    value = block.get(key)
    return value if isinstance(value, str) else ""


def _image(source: Any) -> None:
    if not isinstance(source, dict):
        raise BadRequest("invalid image source")
    if source.get("type") != "base64":
        raise BadRequest(
            f"invalid image source type: {_str(source, 'type')}. Only base64 images are supported."
        )
    if (why := base64_error(_str(source, "data"))) is not None:
        raise BadRequest(f"invalid base64 image data: {why}")


def _tool_result(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    text = []
    for cb in (c for c in content if isinstance(c, dict)):
        if cb.get("type") == "text":
            text.append(_str(cb, "text"))
        elif cb.get("type") == "image":
            if not isinstance(cb.get("source"), dict):
                raise BadRequest("invalid tool_result image source")
            _image(cb["source"])
    return "".join(text)


def _turns(message: Any) -> list[tuple[str, str]]:
    """One Anthropic message as the chat turns Ollama makes of it: tool results (``tool`` turns,
    ahead of a user's text), then the text, images, tool calls and thinking as one turn, or none."""
    if not isinstance(message, dict):
        raise BadRequest(
            f"json: cannot unmarshal {go_kind(message)} into Go value of type anthropic.MessageParam"
        )
    role = _str(message, "role").lower()
    text: list[str] = []
    results: list[tuple[str, str]] = []
    other = False  # images, tool calls or thinking: the turn is kept without text
    for block in _blocks(message.get("content")):
        if not isinstance(block, dict):
            raise BadRequest(
                f"json: cannot unmarshal {go_kind(block)} into Go value of type anthropic.ContentBlock"
            )
        typ = block.get("type")
        if typ == "text":
            text.append(_str(block, "text"))
        elif typ == "image":
            _image(block.get("source"))
            other = True
        elif typ == "tool_use":
            if not _str(block, "id"):
                raise BadRequest("tool_use block missing required 'id' field")
            if not _str(block, "name"):
                raise BadRequest("tool_use block missing required 'name' field")
            other = True
        elif typ == "tool_result":
            results.append(("tool", _tool_result(block.get("content"))))
        elif typ == "thinking":
            other = other or bool(_str(block, "thinking"))
    joined = "".join(text)
    turn = [(role, joined)] if joined or other else []
    return results + turn if role == "user" else turn + results


def _tool(t: Any) -> dict[str, Any]:
    if not isinstance(t, dict):
        raise BadRequest(f"json: cannot unmarshal {go_kind(t)} into Go value of type anthropic.Tool")
    name = _str(t, "name")
    schema = t.get("input_schema")
    if schema is not None and not isinstance(schema, dict):
        raise BadRequest(
            f'invalid input_schema for tool "{name}": json: cannot unmarshal {go_kind(schema)} '
            "into Go value of type api.ToolFunctionParameters"
        )
    fn = {"name": name, "description": _str(t, "description"), "parameters": schema or {}}
    return {"type": "function", "function": fn}


def _think(body: Mapping[str, Any]) -> bool | str | None:
    thinking = body.get("thinking")
    typ = thinking.get("type") if isinstance(thinking, dict) else None
    if typ == "enabled":
        return True
    if typ == "disabled":
        return False
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    if isinstance(effort, str):
        effort = effort.strip().lower()
        effort = "high" if effort == "xhigh" else effort
        if effort in _EFFORTS:
            return effort
    return None


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_predict": body["max_tokens"]}
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            opts[key] = body[key]
    if body.get("stop_sequences"):
        opts["stop"] = body["stop_sequences"]
    return opts


def _block_chars(block: Any) -> int:
    if not isinstance(block, dict):
        return 0
    n = sum(blen(block[k]) for k in ("text", "thinking") if isinstance(block.get(k), str))
    if block.get("type") in ("tool_use", "tool_result"):
        n += len(encode(block))
    return n


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Ollama's input-token estimate for ``message_start`` (characters / 4, at least 1)."""
    system = body.get("system")
    total = 0
    if isinstance(system, str):
        total += blen(system)
    elif isinstance(system, list):
        total += sum(_block_chars(b) for b in system)
    elif system is not None:
        total += len(encode(system))
    messages = body.get("messages") or []
    for m in messages:
        if isinstance(m, dict):
            total += blen(_str(m, "role"))
            content = m.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            total += sum(_block_chars(b) for b in blocks or ())
    for t in body.get("tools") or ():
        if isinstance(t, dict):
            schema = t.get("input_schema")
            total += blen(_str(t, "name")) + blen(_str(t, "description"))
            total += len(encode(schema)) if schema is not None else 0
    tokens = total // 4
    return 1 if tokens == 0 and (messages or system is not None) else tokens


def _stop_reason(done_reason: str, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_use"
    return {"stop": "end_turn", "length": "max_tokens", "": ""}.get(done_reason, "stop_sequence")


class _Events:
    """Ollama's ``anthropic.StreamConverter``: chat chunks in, Anthropic's SSE events out."""

    def __init__(self, ident: str, model: str, estimate: int) -> None:
        self.ident = ident
        self.model = model
        self.estimate = estimate
        self.started = False
        self.index = 0
        self.thinking = False  # a thinking block is open
        self.text = False  # a text block is open
        self.tools = 0

    def _start(self, prompt_eval_count: int = 0) -> bytes:
        if self.started:
            return b""
        self.started = True
        usage = {"input_tokens": prompt_eval_count or self.estimate, "output_tokens": 0}
        message = {
            "id": self.ident,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "usage": usage,
        }
        return sse_event("message_start", {"type": "message_start", "message": message})

    def _open(self, block: dict[str, Any]) -> bytes:
        return sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": self.index, "content_block": block},
        )

    def _stop(self) -> bytes:
        out = sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index})
        self.index += 1
        return out

    def _delta(self, typ: bytes, field: bytes, piece: str) -> bytes:  # the hot path, pre-encoded
        head = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"'
        return head % self.index + typ + b'","' + field + b'":' + encode(piece) + b"}}\n\n"

    def think(self, piece: str) -> bytes:
        out = self._start()
        if not self.thinking:
            self.thinking = True
            out += self._open({"type": "thinking", "thinking": ""})
        return out + self._delta(b"thinking_delta", b"thinking", piece)

    def say(self, piece: str) -> bytes:
        out = self._start()
        if self.thinking:
            self.thinking = False
            out += self._stop()
        if not self.text:
            self.text = True
            out += self._open({"type": "text", "text": ""})
        return out + self._delta(b"text_delta", b"text", piece)

    def call(self, calls: list[ToolCall]) -> bytes:
        out = self._start()
        for c in calls:
            if self.thinking or self.text:
                self.thinking = self.text = False
                out += self._stop()
            out += self._open({"type": "tool_use", "id": c.id, "name": c.name, "input": {}})
            delta = {"type": "input_json_delta", "partial_json": encode(c.arguments).decode()}
            out += sse_event(
                "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}
            )
            out += self._stop()
            self.tools += 1
        return out

    def done(self, done_reason: str, prompt_eval_count: int, eval_count: int) -> bytes:
        out = self._start(prompt_eval_count)
        if self.thinking or self.text:
            out += sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index})
        reason = _stop_reason(done_reason, self.tools > 0)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason} if reason else {},
            "usage": {"input_tokens": prompt_eval_count, "output_tokens": eval_count},
        }
        return out + sse_event("message_delta", delta) + sse_event("message_stop", {"type": "message_stop"})


class AnthropicRoutes:
    def __init__(self, ctx: SimContext) -> None:
        self.ctx = ctx
        self.rng = random.Random(ctx.config.seed)

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.messages)

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{self.rng.getrandbits(96):024x}"

    def _error(self, e: CorralError) -> web.Response:
        return anthropic_error(e.status, e.message, self._id("req"))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        ctx = self.ctx
        try:
            body = go_body(await request.read(), "anthropic.MessagesRequest", _FIELDS)
            check_fields(body, "MessagesRequest", _SPEC)
            raw = body.get("model") or ""
            if not raw:
                raise BadRequest("model is required")
            if (body.get("max_tokens") or 0) <= 0:
                raise BadRequest("max_tokens is required and must be positive")
            if not body.get("messages"):
                raise BadRequest("messages is required")
            turns = [t for m in body["messages"] for t in _turns(m)]
            tools = [_tool(t) for t in body.get("tools") or ()]
            system = body.get("system")
            if isinstance(system, list):
                system = "".join(
                    _str(b, "text") for b in system if isinstance(b, dict) and b.get("type") == "text"
                )
            if isinstance(system, str) and system:
                turns.insert(0, ("system", system))
            think = _think(body)
            model = find_model(ctx, raw, f"model '{raw}' not found")
            caps = model.config.capabilities
            if "completion" not in caps:
                raise unsupported(ctx, f'"{raw}" does not support chat')
            if tools and "tools" not in caps:
                raise unsupported(ctx, f"{model.name.canonical} does not support tools")
            if "thinking" not in caps and think_flag(think, False):
                think = None  # Ollama relaxes the thinking check for Anthropic clients
            opts = merged_options(model, _options(body))
            ropts = runner_options(ctx, model, opts)
        except CorralError as e:
            return self._error(e)
        ident = self._id("msg")
        stream = body.get("stream") is True
        job = Job(model=model, options=ropts, keep_alive=None, tokens=[], t0=t0)
        if not turns:  # nothing to say: the chat's load-only reply
            if (failed := await load_only(ctx.engine, job)) is not None:
                return self._error(failed)
            if stream:
                events = _Events(ident, raw, estimate_tokens(body))
                return await finish_stream(StreamWriter(request, SSE), events.done("load", 0, 0))
            empty = Plan(thinking=[], content=[], tool_calls=[], done_reason="load")
            return json_response(self._message(ident, raw, empty, (0, 0)))
        plan = await plan_chat(
            ctx, request, job, model, turns, tools, opts, think=think_flag(think, "thinking" in caps)
        )
        if not stream:
            try:
                out = await ctx.engine.run(job, None)
            except CorralError as e:
                return self._error(e)
            return json_response(self._message(ident, raw, plan, (out.prompt_eval_count, out.eval_count)))
        events = _Events(ident, raw, estimate_tokens(body))
        return await stream_converted(
            request,
            ctx.engine,
            job,
            events,
            failed=self._error,
            done=lambda out: events.done(plan.done_reason, out.prompt_eval_count, out.eval_count),
        )

    @staticmethod
    def _message(ident: str, model: str, plan: Plan, usage: tuple[int, int]) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if plan.thinking:
            content.append({"type": "thinking", "thinking": "".join(plan.thinking)})
        if plan.content:
            content.append({"type": "text", "text": "".join(plan.content)})
        content += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in plan.tool_calls
        ]
        message: dict[str, Any] = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content or None,  # Go's nil slice
        }
        if reason := _stop_reason(plan.done_reason, bool(plan.tool_calls)):
            message["stop_reason"] = reason
        message["usage"] = {"input_tokens": usage[0], "output_tokens": usage[1]}
        return message
