"""ollama-sim's /v1/messages (Anthropic) and /v1/responses (OpenAI Responses) over a real socket,
driven by the official `anthropic` and `openai` SDKs and raw HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from corral.simulator import SimServer, load_config

pytestmark = pytest.mark.integration

WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ASK = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(load_config(time_scale=0.0005, vram_release_s=0.1), port=0) as server:
        yield server


@pytest.fixture
async def ant(sim: SimServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    c = anthropic.AsyncAnthropic(base_url=sim.url, api_key="x", max_retries=0)
    yield c
    await c.close()


@pytest.fixture
async def oai(sim: SimServer) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    yield c
    await c.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def sse_frames(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``event: <type>\\ndata: <json>\\n\\n`` frames, checked to be exactly that."""
    text = raw.decode()
    assert text.endswith("\n\n")
    frames = []
    for frame in text[:-2].split("\n\n"):
        event, data = frame.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        frames.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return frames


# ---- /v1/messages -------------------------------------------------------------------------------


async def test_messages_create(ant: anthropic.AsyncAnthropic) -> None:
    r = await ant.messages.create(model="llama3.2", max_tokens=256, messages=ASK)
    assert r.id.startswith("msg_") and len(r.id) == 28
    assert r.type == "message" and r.role == "assistant" and r.model == "llama3.2"
    assert r.stop_reason == "end_turn"
    assert [b.type for b in r.content] == ["text"]
    assert isinstance(r.content[0], anthropic.types.TextBlock) and r.content[0].text
    assert r.usage.input_tokens > 0 and r.usage.output_tokens >= 20


async def test_messages_max_tokens_and_system(ant: anthropic.AsyncAnthropic) -> None:
    r = await ant.messages.create(
        model="llama3.2", max_tokens=3, system=[{"type": "text", "text": "Be brief."}], messages=ASK
    )
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 3


async def test_messages_thinking(ant: anthropic.AsyncAnthropic) -> None:
    r = await ant.messages.create(model="qwen3:8b", max_tokens=512, messages=ASK)  # on by default
    assert [b.type for b in r.content] == ["thinking", "text"]
    off = await ant.messages.create(
        model="qwen3:8b", max_tokens=512, messages=ASK, thinking={"type": "disabled"}
    )
    assert [b.type for b in off.content] == ["text"]
    # a model that cannot think just answers: no 400 on this route
    plain = await ant.messages.create(
        model="llama3.2", max_tokens=512, messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024}
    )
    assert [b.type for b in plain.content] == ["text"]


async def test_messages_stream(ant: anthropic.AsyncAnthropic) -> None:
    async with ant.messages.stream(model="llama3.2", max_tokens=256, messages=ASK) as stream:
        parts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(parts) > 1
    assert isinstance(final.content[0], anthropic.types.TextBlock)
    assert final.content[0].text == "".join(parts)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens >= 20
    # the same request unstreamed gives the same reply
    r = await ant.messages.create(model="llama3.2", max_tokens=256, messages=ASK)
    assert [b.model_dump(exclude={"parsed_output"}) for b in final.content] == [
        b.model_dump() for b in r.content
    ]


async def test_messages_stream_thinking(ant: anthropic.AsyncAnthropic) -> None:
    async with ant.messages.stream(model="qwen3:8b", max_tokens=512, messages=ASK) as stream:
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert isinstance(final.content[0], anthropic.types.ThinkingBlock) and final.content[0].thinking


async def test_messages_tool_round_trip(ant: anthropic.AsyncAnthropic) -> None:
    ask = [{"role": "user", "content": "Call get_weather for my city"}]
    r = await ant.messages.create(model="llama3.2", max_tokens=256, messages=ask, tools=[WEATHER])
    assert r.stop_reason == "tool_use"
    call = r.content[-1]
    assert isinstance(call, anthropic.types.ToolUseBlock)
    assert call.name == "get_weather" and isinstance(call.input, dict) and "city" in call.input
    # streamed, the input arrives as one input_json_delta the SDK parses back
    async with ant.messages.stream(model="llama3.2", max_tokens=256, messages=ask, tools=[WEATHER]) as s:
        streamed = await s.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in r.content]
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}
    history: list[Any] = [
        *ask,
        {"role": "assistant", "content": [b.model_dump() for b in r.content]},
        {"role": "user", "content": [result]},
    ]
    answer = await ant.messages.create(model="llama3.2", max_tokens=256, messages=history, tools=[WEATHER])
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"


async def test_messages_errors(ant: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        await ant.messages.create(model="nope", max_tokens=16, messages=ASK)
    assert e.value.status_code == 404
    assert e.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model 'nope' not found"},
        "request_id": e.value.body["request_id"],
    }
    with pytest.raises(anthropic.BadRequestError) as bad:
        await ant.messages.create(model="all-minilm", max_tokens=16, messages=ASK)
    assert '"all-minilm" does not support chat' in str(bad.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "EOF"),
        (b"{}", "model is required"),
        (
            b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}',
            "max_tokens is required and must be positive",
        ),
        (b'{"model":"llama3.2","max_tokens":0,"messages":[]}', "max_tokens is required and must be positive"),
        (b'{"model":"llama3.2","max_tokens":8}', "messages is required"),
        (
            b'{"model":"llama3.2","max_tokens":"8"}',
            "json: cannot unmarshal string into Go struct field MessagesRequest.max_tokens of type int",
        ),
        (
            b'{"model":"llama3.2","max_tokens":8,"messages":[{"role":"user","content":'
            b'[{"type":"image","source":{"type":"url","url":"http://x/y.png"}}]}]}',
            "invalid image source type: url. Only base64 images are supported.",
        ),
    ],
)
async def test_messages_bad_requests(
    sim: SimServer, http: aiohttp.ClientSession, body: bytes, message: str
) -> None:
    async with http.post(sim.url + "/v1/messages", data=body) as r:
        assert r.status == 400
        got = await r.json()
    assert got["type"] == "error"
    assert got["error"] == {"type": "invalid_request_error", "message": message}
    assert got["request_id"].startswith("req_") and len(got["request_id"]) == 28


async def test_messages_sse_framing(sim: SimServer, http: aiohttp.ClientSession) -> None:
    body = {"model": "llama3.2", "max_tokens": 256, "messages": ASK, "stream": True}
    async with http.post(sim.url + "/v1/messages", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        frames = sse_frames(await r.read())
    names = [name for name, _ in frames]
    assert all(data["type"] == name for name, data in frames)
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    start = frames[0][1]["message"]
    assert start["content"] == [] and start["usage"]["output_tokens"] == 0
    assert start["usage"]["input_tokens"] == len("userWhy is the sky blue?") // 4  # Ollama's estimate
    assert frames[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert frames[-2][1]["delta"] == {"stop_reason": "end_turn"}
    assert frames[-2][1]["usage"]["output_tokens"] == len(names) - 5


# ---- /v1/responses ------------------------------------------------------------------------------


async def test_responses_create(oai: openai.AsyncOpenAI) -> None:
    r = await oai.responses.create(model="llama3.2", input="Why is the sky blue?", instructions="Be kind.")
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.model == "llama3.2" and r.instructions == "Be kind." and r.output_text
    assert [o.type for o in r.output] == ["message"]
    assert r.usage is not None and r.usage.input_tokens > 0 and r.usage.output_tokens >= 20
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.temperature == 1.0 and r.tools == [] and r.completed_at is not None


async def test_responses_reasoning_and_tools(oai: openai.AsyncOpenAI) -> None:
    r = await oai.responses.create(model="qwen3:8b", input="Why?", reasoning={"effort": "high"})
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.reasoning is not None and r.reasoning.effort == "high"
    tool: Any = {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": WEATHER["input_schema"],
    }
    call = await oai.responses.create(model="llama3.2", input="Call get_weather please", tools=[tool])
    assert [o.type for o in call.output] == ["function_call"]
    fc = call.output[0]
    assert isinstance(fc, openai.types.responses.ResponseFunctionToolCall)
    assert fc.name == "get_weather" and "city" in json.loads(fc.arguments)
    follow_up: Any = [
        {"role": "user", "content": "Call get_weather please"},
        {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
        {"type": "function_call_output", "call_id": fc.call_id, "output": "Sunny"},
    ]
    answer = await oai.responses.create(model="llama3.2", input=follow_up, tools=[tool])
    assert answer.output_text


async def test_responses_stream(oai: openai.AsyncOpenAI) -> None:
    deltas, types, seqs = [], [], []
    completed = None
    stream = await oai.responses.create(model="llama3.2", input="Why is the sky blue?", stream=True)
    async for ev in stream:
        types.append(ev.type)
        seqs.append(ev.sequence_number)
        if ev.type == "response.output_text.delta":
            deltas.append(ev.delta)
        elif ev.type == "response.completed":
            completed = ev.response
    assert seqs == list(range(len(seqs)))
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert completed is not None and completed.status == "completed"
    assert len(deltas) > 1 and completed.output_text == "".join(deltas)


async def test_responses_stream_helper_with_reasoning(oai: openai.AsyncOpenAI) -> None:
    async with oai.responses.stream(model="qwen3:8b", input="Why?") as stream:
        final = await stream.get_final_response()
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.output_text


async def test_responses_errors(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        await oai.responses.create(model="nope", input="hi")
    assert e.value.status_code == 404
    assert e.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.responses.create(model="llama3.2", input="hi", reasoning={"effort": "extreme"})
    assert "invalid reasoning value: 'extreme'" in str(bad.value)
    files: Any = [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.responses.create(model="llama3.2", input=files)
    assert "file inputs are not currently supported" in str(bad.value)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"input":"hi"}', 400, "model is required"),
        (
            b'{"model":"llama3.2","input":[{"type":"bogus"}]}',
            400,
            'input[0]: unknown input item type: "bogus"',
        ),
        (b'{"model":"nope","input":"hi"}', 404, "model 'nope' not found"),
    ],
)
async def test_responses_bad_requests(
    sim: SimServer, http: aiohttp.ClientSession, body: bytes, status: int, message: str
) -> None:
    async with http.post(sim.url + "/v1/responses", data=body) as r:
        assert r.status == status
        got = await r.json()
    kind = "invalid_request_error" if status == 400 else "not_found_error"
    assert got == {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def test_responses_no_input_only_loads(oai: openai.AsyncOpenAI) -> None:
    r = await oai.responses.create(model="llama3.2", input=[])
    assert r.status == "completed" and r.output_text == ""
    assert r.usage is not None and r.usage.output_tokens == 0


async def test_responses_sse_framing(sim: SimServer, http: aiohttp.ClientSession) -> None:
    body = {"model": "llama3.2", "input": "hi", "stream": True}
    async with http.post(sim.url + "/v1/responses", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        frames = sse_frames(await r.read())
    assert [data["sequence_number"] for _, data in frames] == list(range(len(frames)))
    assert all(data["type"] == name for name, data in frames)
    created = frames[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    done = frames[-1][1]["response"]
    assert done["status"] == "completed" and done["completed_at"] is not None
    text = "".join(d["delta"] for name, d in frames if name == "response.output_text.delta")
    assert done["output"][0]["content"][0]["text"] == text
