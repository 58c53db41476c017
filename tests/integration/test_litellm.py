"""LiteLLM's Ollama providers (`ollama/` over /api/generate, `ollama_chat/` over /api/chat, embeddings
over /api/embed) with a `corral up` process as their Ollama.

Against a real process, not a fleet in this one: LiteLLM's success logging asks the model's
/api/show with a blocking HTTP call from inside the event loop, which would wait on a gateway served by
that same loop.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import ollama
import pytest
from corral.runtime.natsserver import NatsServer

from tests.integration.corral_up import CorralUp, corral_up

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its bundled price list, not a download
import litellm  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    # pydantic's note on a TypedDict inside LiteLLM, raised when LiteLLM first builds a schema from it
    pytest.mark.filterwarnings("ignore:Items? .* (is|are) using the `ReadOnly` qualifier:UserWarning"),
]

MODEL = "llama3.2"
ASK = [{"role": "user", "content": "why is the sky blue?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
async def up(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CorralUp]:
    log = tmp_path_factory.mktemp("litellm") / "corral-up.log"
    async with corral_up(nats_server.url, "litellm", log, sims=2) as up:
        yield up


async def streamed_text(stream: Any) -> tuple[int, str, str | None]:
    """(chunks, joined content, last finish_reason) of a LiteLLM stream."""
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    return len(chunks), text, reasons[-1] if reasons else None


async def test_ollama_chat_answers_what_the_python_client_gets(up: CorralUp) -> None:
    r = await litellm.acompletion(model=f"ollama_chat/{MODEL}", api_base=up.url, messages=ASK, seed=4)
    n, streamed, reason = await streamed_text(
        await litellm.acompletion(
            model=f"ollama_chat/{MODEL}", api_base=up.url, messages=ASK, seed=4, stream=True
        )
    )
    async with ollama.AsyncClient(host=up.url) as client:
        ref = await client.chat(model=MODEL, messages=ASK, options={"seed": 4})
    text = r.choices[0].message.content
    assert text == streamed == ref.message.content and len(text) > 20 and n > 2
    assert r.model == f"ollama_chat/{MODEL}" and r.choices[0].finish_reason == reason == "stop"
    assert r.usage.completion_tokens == ref.eval_count and r.usage.prompt_tokens == ref.prompt_eval_count


async def test_ollama_generate_provider_streams_what_it_answers(up: CorralUp) -> None:
    r = await litellm.acompletion(model=f"ollama/{MODEL}", api_base=up.url, messages=ASK, seed=4)
    n, streamed, reason = await streamed_text(
        await litellm.acompletion(model=f"ollama/{MODEL}", api_base=up.url, messages=ASK, seed=4, stream=True)
    )
    text = r.choices[0].message.content
    assert text == streamed and len(text) > 20 and n > 2 and reason == "stop"
    assert r.model == f"ollama/{MODEL}" and r.usage.completion_tokens > 0
    other = await litellm.acompletion(model=f"ollama/{MODEL}", api_base=up.url, messages=ASK, seed=5)
    assert other.choices[0].message.content != text  # the seed reached the model


async def test_a_tool_call_through_ollama_chat(up: CorralUp) -> None:
    r = await litellm.acompletion(
        model=f"ollama_chat/{MODEL}",
        api_base=up.url,
        messages=[{"role": "user", "content": "use get_weather please"}],
        tools=[WEATHER],
    )
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments)["city"] in {"Paris", "Tokyo", "Lima", "Oslo"}
    plain = await litellm.acompletion(
        model=f"ollama_chat/{MODEL}", api_base=up.url, messages=ASK, tools=[WEATHER]
    )
    assert not plain.choices[0].message.tool_calls and plain.choices[0].message.content


async def test_aembedding_is_one_agents_vector(up: CorralUp) -> None:
    e = await litellm.aembedding(model="ollama/all-minilm", api_base=up.url, input=["a", "b"])
    vectors = [d["embedding"] for d in e.data]
    assert [len(v) for v in vectors] == [384, 384] and vectors[0] != vectors[1]
    assert e.usage.prompt_tokens == 2
    answered, loaded = [], []
    for agent, url in up.backends.items():
        async with ollama.AsyncClient(host=url) as direct:
            if "all-minilm:latest" in [m.model for m in (await direct.ps()).models]:
                loaded.append(agent)
                # each simulated server has its own seed, so the vector says which one answered
                answered += (
                    [agent]
                    if list((await direct.embed("all-minilm", "a")).embeddings[0]) == vectors[0]
                    else []
                )
    assert len(loaded) == 1 and answered == loaded


async def test_an_unknown_model_is_ollamas_not_found(up: CorralUp) -> None:
    with pytest.raises(litellm.exceptions.NotFoundError) as e:
        await litellm.acompletion(model="ollama_chat/no-such-model", api_base=up.url, messages=ASK)
    assert e.value.status_code == 404 and "model 'no-such-model' not found" in str(e.value)
