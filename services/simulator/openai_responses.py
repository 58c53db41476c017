"""OpenAI Responses compatibility, ``POST /v1/responses``
(https://docs.ollama.com/api/openai-compatibility): Ollama's middleware turns the request into an
``/api/chat`` request and the chat's replies into response objects; here the same translation runs
onto the simulated chat path.

``input`` is a string (one user message) or items: ``message`` (``type`` may be left out when a
``role`` is given; content a string or ``input_text`` / ``output_text`` / ``input_image`` parts),
``function_call``, ``function_call_output``, ``reasoning``; ``instructions`` leads as a system
message; no input only loads the model and completes with empty text. ``max_output_tokens`` is
``num_predict``, ``temperature`` 1.0 when absent, ``reasoning.effort`` ``think`` (mapped as
``/v1/chat/completions`` maps ``reasoning_effort``), a ``json_schema`` ``text.format`` the format.
The reply is always ``completed``: an optional ``reasoning`` item, then ``function_call`` items or
one assistant ``message``; errors use OpenAI's error object. Streams are SSE (``event: <type>\ndata:
<json>\n\n``), each payload numbered by ``sequence_number`` with its keys in Go's map order:
``response.created``, ``response.in_progress``, each item from ``output_item.added`` through its
deltas to ``output_item.done``, ``response.completed``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any, Final

import msgspec
from aiohttp import web
from corral.protocol.errors import BadRequest, CorralError
from corral.protocol.gojson import base64_error
from corral.protocol.gojson import kind as go_kind
from corral.simulator.chatplan import load_only, plan_chat
from corral.simulator.context import SimContext
from corral.simulator.converted import stream_converted
from corral.simulator.engine import Job, Outcome
from corral.simulator.native import find_model, merged_options, runner_options, unsupported
from corral.simulator.openai_compat import EFFORT, openai_error  # reasoning_effort's mapping
from corral.simulator.responses import SSE, StreamWriter, finish_stream, json_response, sse_event
from corral.simulator.text import Plan, ToolCall
from corral.simulator.wire import check_fields, go_body, think_flag

# openai.ResponsesRequest: each field's Go type, for Go's decoding errors
_SPEC: Final = dict(
    f.split(":", 1)
    for f in (
        "model:string background:bool include:[]string instructions:string max_output_tokens:int"
        " reasoning:openai.ResponsesReasoning temperature:float64 text:openai.ResponsesText top_p:float64"
        " truncation:string tools:[]openai.ResponsesTool stream:bool"
    ).split()
)
_FIELDS: Final = frozenset({*_SPEC, "input", "conversation"})
_CONTENT_TYPES: Final = frozenset({"input_text", "output_text", "input_image", "input_file"})
_PEEK: Final = 'struct { Type string "json:\\"type\\"" }'  # Go's name of the struct a type is read into
_sorted = msgspec.json.Encoder(order="sorted").encode  # Go marshals a map[string]any key-sorted


def _parts(value: Any, where: str) -> list[dict[str, Any]]:
    """Content parts as Ollama decodes them: a string is one ``input_text``."""
    if value is None or isinstance(value, str):
        return [{"type": "input_text", "text": value or ""}]
    if not isinstance(value, list):
        raise BadRequest(
            f"{where} must be a string or array: json: cannot unmarshal {go_kind(value)} "
            "into Go value of type []json.RawMessage"
        )
    for i, part in enumerate(value):
        if not isinstance(part, dict):
            raise BadRequest(
                f"{where}[{i}]: json: cannot unmarshal {go_kind(part)} into Go value of type {_PEEK}"
            )
        typ = part.get("type")
        if typ not in _CONTENT_TYPES:
            raise BadRequest(f"{where}[{i}]: unknown content type: {typ if isinstance(typ, str) else ''}")
    return value


def _items(inp: Any) -> list[dict[str, Any]]:
    """``input`` as decoded items (Go's ``ResponsesInput``), each with its ``type`` filled in."""
    if inp is None or inp == "":
        return []
    if isinstance(inp, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": inp}]}]
    if not isinstance(inp, list):
        raise BadRequest(
            f"input must be a string or array: json: cannot unmarshal {go_kind(inp)} "
            "into Go value of type []json.RawMessage"
        )
    items = []
    for i, item in enumerate(inp):
        if not isinstance(item, dict):
            peek = _PEEK[:-2] + '; Role string "json:\\"role\\"" }'
            raise BadRequest(
                f"input[{i}]: json: cannot unmarshal {go_kind(item)} into Go value of type {peek}"
            )
        typ = item.get("type") if isinstance(item.get("type"), str) else ""
        if not typ and isinstance(item.get("role"), str) and item["role"]:
            typ = "message"
        if typ == "message":
            if "content" in item:
                item = {**item, "content": _parts(item["content"], f"input[{i}]: content")}
        elif typ == "function_call_output":
            _parts(item.get("output"), f"input[{i}]: output")
        elif typ not in ("function_call", "reasoning"):
            if not typ:
                raise BadRequest(f"input[{i}]: input item missing required 'type' field")
            raise BadRequest(f'input[{i}]: unknown input item type: "{typ}"')
        items.append({**item, "type": typ})
    return items


def _image(url: str) -> None:
    if url.startswith(("http://", "https://")):
        raise BadRequest("image URLs are not currently supported, please use base64 encoded data instead")
    for prefix in ("data:;base64,", *(f"data:image/{t};base64," for t in ("jpeg", "jpg", "png", "webp"))):
        if url.startswith(prefix):
            if base64_error(url[len(prefix) :]) is None:
                return
            break
    raise BadRequest("invalid image input")


def _text(parts: Any) -> str:
    text = []
    for part in parts or ():
        typ = part.get("type")
        if typ in ("input_text", "output_text"):
            text.append(str(part.get("text") or ""))
        elif typ == "input_image" and part.get("image_url"):
            _image(str(part["image_url"]))
        elif typ == "input_file":
            raise BadRequest("file inputs are not currently supported")
    return "".join(text)


def _turns(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The chat messages of Ollama's ``FromResponsesRequest`` as (role, content) turns."""
    turns: list[tuple[str, str]] = []
    pending = False  # reasoning waiting for the next assistant message
    for item in items:
        typ = item["type"]
        if typ == "reasoning":
            pending = bool(item.get("encrypted_content"))
        elif typ == "message":
            turns.append((str(item.get("role") or ""), _text(item.get("content"))))
            pending = pending and turns[-1][0] != "assistant"
        elif typ == "function_call":
            args = item.get("arguments")
            if isinstance(args, str) and args:
                try:
                    parsed = msgspec.json.decode(args)
                except msgspec.DecodeError as e:
                    raise BadRequest(f"failed to parse function call arguments: {e}") from None
                if not isinstance(parsed, dict):
                    raise BadRequest(
                        f"failed to parse function call arguments: json: cannot unmarshal {go_kind(parsed)} "
                        "into Go value of type map[string]interface {}"
                    )
            if not turns or turns[-1][0] != "assistant":
                turns.append(("assistant", ""))
            pending = False
        else:  # function_call_output
            output = item.get("output")
            turns.append(("tool", output if isinstance(output, str) else _text(output)))
    if pending:
        turns.append(("assistant", ""))
    return turns


def _tool(t: Any) -> dict[str, Any]:
    """A tool as the response echoes it (Go's ``ResponsesTool``)."""
    t = t if isinstance(t, dict) else {}
    echo = {"type": t.get("type", ""), "name": t.get("name", "")}
    return echo | {k: t.get(k) for k in ("description", "strict", "parameters")}


def _format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict):
        return None
    out = {"type": fmt.get("type", "")}
    out.update({k: fmt[k] for k in ("name", "schema", "strict") if fmt.get(k) not in (None, "")})
    return out


def _think(body: Mapping[str, Any]) -> bool | str | None:
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort is None or effort == "":
        return None
    if not isinstance(effort, str):
        raise BadRequest(
            f"json: cannot unmarshal {go_kind(effort)} into Go struct field "
            "ResponsesRequest.reasoning.effort of type string"
        )
    if effort not in EFFORT:
        raise BadRequest(
            f'invalid reasoning value: \'{effort}\' (must be "high", "medium", "low", or "none")'
        )
    return EFFORT[effort]


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    temperature = body.get("temperature")
    opts: dict[str, Any] = {"temperature": 1.0 if temperature is None else temperature}
    if body.get("top_p") is not None:
        opts["top_p"] = body["top_p"]
    if body.get("max_output_tokens") is not None:
        opts["num_predict"] = body["max_output_tokens"]
    return opts


def _usage(out: Outcome | None) -> dict[str, Any]:
    p = out.prompt_eval_count if out else 0
    c = out.eval_count if out else 0
    details = {"input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
    return {"input_tokens": p, "output_tokens": c, "total_tokens": p + c} | details


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(ident: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": ident, "type": "message", "status": status, "role": "assistant", "content": content}


def _reasoning(ident: str, text: str) -> dict[str, Any]:
    summary = [{"type": "summary_text", "text": text}]
    return {"id": ident, "type": "reasoning", "summary": summary, "encrypted_content": text}


def _call(ident: str, status: str, c: ToolCall, arguments: str) -> dict[str, Any]:
    item = {"id": ident, "type": "function_call", "status": status}
    return item | {"call_id": c.id, "name": c.name, "arguments": arguments}


class _Request:
    """What the reply echoes of the request (Ollama's ``ToResponse`` / ``buildResponseObject``)."""

    def __init__(self, body: Mapping[str, Any], model: str, ident: str) -> None:
        self.body = body
        self.model = model
        self.ident = ident

    def response(self, status: str, output: Any, usage: Any, *, stream: bool) -> dict[str, Any]:
        b = self.body
        reasoning = b["reasoning"] if isinstance(b.get("reasoning"), dict) else {}
        echo = {k: reasoning.get(k) or None for k in ("effort", "summary")}
        if not stream or not any(echo.values()):  # Go: set keys only, or both with null, or null
            echo = {k: v for k, v in echo.items() if v is not None}
        top_p, temperature = b.get("top_p"), b.get("temperature")
        return {
            "id": self.ident,
            "object": "response",
            "created_at": int(time.time()),
            "completed_at": int(time.time()) if status == "completed" else None,
            "status": status,
            "incomplete_details": None,
            "model": self.model,
            "previous_response_id": None,
            "instructions": b.get("instructions") or None,
            "output": output,
            "error": None,
            "tools": [_tool(t) for t in b.get("tools") or ()],
            "tool_choice": "auto",
            "truncation": b.get("truncation") or "disabled",
            "parallel_tool_calls": True,
            "text": {"format": _format(b) or {"type": "text"}},
            "top_p": 1.0 if top_p is None else top_p,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "top_logprobs": 0,
            "temperature": 1.0 if temperature is None else temperature,
            "reasoning": echo or None,
            "usage": usage,
            "max_output_tokens": b.get("max_output_tokens"),
            "max_tool_calls": None,
            "store": False,
            "background": bool(b.get("background")),
            "service_tier": "default",
            "metadata": {},
            "safety_identifier": None,
            "prompt_cache_key": None,
        }


class _Events:
    """Ollama's ``ResponsesStreamConverter``: chat chunks in, numbered Responses events out."""

    def __init__(self, request: _Request, item_id: str, rng: random.Random) -> None:
        self.request = request
        self.item_id = item_id
        self.rng = rng
        self.seq = 0
        self.started = False
        self.index = 0  # output_index of the item being written
        self.thinking: list[str] = []
        self.reasoning_id = ""
        self.reasoning_done = False
        self.text: list[str] = []
        self.calls: list[dict[str, Any]] = []

    def _event(self, typ: str, data: dict[str, Any]) -> bytes:
        data["type"] = typ
        data["sequence_number"] = self.seq
        self.seq += 1
        return sse_event(typ, data, _sorted)

    def _begin(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return b"".join(
            self._event(t, {"response": self.request.response("in_progress", [], None, stream=True)})
            for t in ("response.created", "response.in_progress")
        )

    def think(self, piece: str) -> bytes:
        out = self._begin()
        if not self.reasoning_id:
            self.reasoning_id = f"rs_{self.rng.randrange(999999)}"
            item = {"id": self.reasoning_id, "type": "reasoning", "summary": []}
            out += self._event("response.output_item.added", {"output_index": self.index, "item": item})
        self.thinking.append(piece)
        delta = {"item_id": self.reasoning_id, "output_index": self.index, "summary_index": 0, "delta": piece}
        return out + self._event("response.reasoning_summary_text.delta", delta)

    def _end_reasoning(self) -> bytes:
        if not self.reasoning_id or self.reasoning_done:
            return b""
        self.reasoning_done = True
        text = "".join(self.thinking)
        done = {"item_id": self.reasoning_id, "output_index": self.index, "summary_index": 0, "text": text}
        out = self._event("response.reasoning_summary_text.done", done)
        item = _reasoning(self.reasoning_id, text)
        out += self._event("response.output_item.done", {"output_index": self.index, "item": item})
        self.index += 1
        return out

    def say(self, piece: str) -> bytes:
        out = self._begin() + self._end_reasoning()
        where = {"item_id": self.item_id, "output_index": self.index, "content_index": 0}
        if not self.text:
            item = _message(self.item_id, "in_progress", [])
            out += self._event("response.output_item.added", {"output_index": self.index, "item": item})
            out += self._event("response.content_part.added", {**where, "part": _text_part("")})
        self.text.append(piece)
        return out + self._event("response.output_text.delta", {**where, "delta": piece, "logprobs": []})

    def call(self, calls: list[ToolCall]) -> bytes:
        out = self._begin() + self._end_reasoning()
        for i, c in enumerate(calls):
            ident, at = f"fc_{self.rng.randrange(999999)}_{i}", self.index + i
            args = msgspec.json.encode(c.arguments).decode()
            self.calls.append(_call(ident, "completed", c, args))
            added = {"output_index": at, "item": _call(ident, "in_progress", c, "")}
            out += self._event("response.output_item.added", added)
            if args:
                delta = {"item_id": ident, "output_index": at, "delta": args}
                out += self._event("response.function_call_arguments.delta", delta)
            done = {"item_id": ident, "output_index": at, "arguments": args}
            out += self._event("response.function_call_arguments.done", done)
            out += self._event("response.output_item.done", {"output_index": at, "item": self.calls[-1]})
        return out

    def done(self, out: Outcome | None) -> bytes:
        data = self._begin() + self._end_reasoning()
        output: list[dict[str, Any]] = []
        if self.reasoning_id:
            output.append(_reasoning(self.reasoning_id, "".join(self.thinking)))
        if self.calls:
            output += self.calls
        elif self.text:
            text = "".join(self.text)
            where = {"item_id": self.item_id, "output_index": self.index, "content_index": 0}
            data += self._event("response.output_text.done", {**where, "text": text, "logprobs": []})
            data += self._event("response.content_part.done", {**where, "part": _text_part(text)})
            output.append(_message(self.item_id, "completed", [_text_part(text)]))
            item_done = {"output_index": self.index, "item": output[-1]}
            data += self._event("response.output_item.done", item_done)
        final = self.request.response("completed", output or None, _usage(out), stream=True)
        return data + self._event("response.completed", {"response": final})


class ResponsesRoutes:
    def __init__(self, ctx: SimContext) -> None:
        self.ctx = ctx
        self.rng = random.Random(ctx.config.seed)

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self.responses)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        ctx = self.ctx
        try:
            body = go_body(await request.read(), "openai.ResponsesRequest", _FIELDS)
            check_fields(body, "ResponsesRequest", _SPEC)
            items = _items(body.get("input"))
            turns = _turns(items)
            if body.get("instructions"):
                turns.insert(0, ("system", body["instructions"]))
            think = _think(body)
            tools = [
                {"type": t["type"], "function": _function(t)} for t in map(_tool, body.get("tools") or ())
            ]
            fmt = _format(body)
            raw = body.get("model") or ""
            if not raw:
                raise BadRequest("model is required")
            model = find_model(ctx, raw, f"model '{raw}' not found")
            caps = model.config.capabilities
            if "completion" not in caps:
                raise unsupported(ctx, f'"{raw}" does not support chat')
            if tools and "tools" not in caps:
                raise unsupported(ctx, f"{model.name.canonical} does not support tools")
            if think_flag(think, False) and "thinking" not in caps:
                raise unsupported(ctx, f'"{raw}" does not support thinking')
            opts = merged_options(model, _options(body))
            ropts = runner_options(ctx, model, opts)
        except CorralError as e:
            return openai_error(e.status, e.message)
        req = _Request(body, raw, f"resp_{self.rng.randrange(999999)}")
        item_id = f"msg_{self.rng.randrange(999999)}"
        stream = body.get("stream") is True
        job = Job(model=model, options=ropts, keep_alive=None, tokens=[], t0=t0)
        empty = Plan(thinking=[], content=[], tool_calls=[], done_reason="load")
        if not turns:  # nothing to answer: the chat's load-only reply
            if (failed := await load_only(ctx.engine, job)) is not None:
                return openai_error(failed.status, failed.message)
            if not stream:
                return json_response(self._response(req, item_id, empty, None))
            writer = StreamWriter(request, SSE)
            return await finish_stream(writer, _Events(req, item_id, self.rng).done(None))
        schema = fmt.get("schema") if fmt and fmt["type"] == "json_schema" else None
        think_as = think_flag(think, "thinking" in caps)
        plan = await plan_chat(ctx, request, job, model, turns, tools, opts, think=think_as, fmt=schema)
        if not stream:
            try:
                out = await ctx.engine.run(job, None)
            except CorralError as e:
                return openai_error(e.status, e.message)
            return json_response(self._response(req, item_id, plan, out))
        events = _Events(req, item_id, self.rng)
        return await stream_converted(
            request,
            ctx.engine,
            job,
            events,
            failed=lambda e: openai_error(e.status, e.message),
            done=events.done,
        )

    @staticmethod
    def _response(req: _Request, item_id: str, plan: Plan, out: Outcome | None) -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        if plan.thinking:
            output.append(_reasoning(f"rs_{req.ident}", "".join(plan.thinking)))
        for i, c in enumerate(plan.tool_calls):
            output.append(
                _call(f"fc_{req.ident}_{i}", "completed", c, msgspec.json.encode(c.arguments).decode())
            )
        if not plan.tool_calls:
            output.append(_message(item_id, "completed", [_text_part("".join(plan.content))]))
        return req.response("completed", output, _usage(out), stream=False)


def _function(t: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": t["name"], "description": t["description"] or "", "parameters": t["parameters"] or {}}
