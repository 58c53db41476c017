"""Ollama's Anthropic Messages and OpenAI Responses compatibility (``/v1/messages``,
``/v1/responses``) through the gateway, with the official ``anthropic`` SDK and the ``openai`` SDK's
Responses API: routed by model like any model call, errors the gateway answers itself in each API's
own shape."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import anthropic
import openai
import pytest
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.integration

MODEL = "llama3.2"


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="msgs",
        sims=default_sims(2, time_scale=0.01),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={"queue_timeout_s": 5.0},
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


async def test_the_anthropic_sdk_gets_messages_whole_and_streamed(fleet: LocalFleet) -> None:
    async with anthropic.AsyncAnthropic(base_url=fleet.url, api_key="unused", max_retries=0) as c:
        raw = await c.messages.with_raw_response.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-corral-model"] == "llama3.2:latest" and raw.headers["x-corral-agent"]
        m = await raw.parse()
        assert m.type == "message" and m.role == "assistant" and m.model == MODEL
        assert [b.type for b in m.content] == ["text"] and m.content[0].text  # type: ignore[union-attr]
        assert m.stop_reason in ("end_turn", "max_tokens") and 0 < m.usage.output_tokens <= 8
        async with c.messages.stream(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi again"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text and final.content[0].text == text  # type: ignore[union-attr]
        assert final.usage.output_tokens > 0


async def test_the_openai_sdks_responses_api_whole_and_streamed(fleet: LocalFleet) -> None:
    async with openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0) as c:
        r = await c.responses.create(model=MODEL, input="hi", max_output_tokens=8)
        assert r.status == "completed" and r.output_text and r.usage is not None
        assert 0 < r.usage.output_tokens <= 8
        stream = await c.responses.create(model=MODEL, input="hi again", max_output_tokens=8, stream=True)
        events = [e async for e in stream]
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas and events[-1].type == "response.completed"
        assert events[-1].response.output_text == deltas  # type: ignore[union-attr]


async def test_what_the_gateway_answers_itself_is_in_each_apis_shape(fleet: LocalFleet) -> None:
    """No agent has the model: the gateway's 404, as the SDKs expect to read it."""
    async with anthropic.AsyncAnthropic(base_url=fleet.url, api_key="unused", max_retries=0) as c:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await c.messages.create(model="nope", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    body = missing.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"] == {"type": "not_found_error", "message": "model 'nope' not found"}
    async with openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0) as o:
        with pytest.raises(openai.NotFoundError) as gone:
            await o.responses.create(model="nope", input="hi")
    assert gone.value.message.endswith("model 'nope' not found") or "model 'nope' not found" in str(
        gone.value
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(fleet.url + "/v1/messages", data=b"") as r:  # Go's decoder's word
            assert r.status == 400 and (await r.json())["error"] == {
                "type": "invalid_request_error",
                "message": "EOF",
            }
        async with s.post(fleet.url + "/v1/messages/count_tokens", json={"model": MODEL}) as r:
            assert r.status == 404  # not a route of Ollama's either
