"""LangChain's Ollama integration (`langchain-ollama`) against the gateway: `ChatOllama` streaming and
tool calls, `OllamaEmbeddings`; against a fleet in this process and against `corral up` as a process."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from corral.protocol.names import parse_name
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims
from langchain_core import messages, tools
from langchain_ollama import ChatOllama, OllamaEmbeddings

from tests.integration.corral_up import corral_up
from tests.integration.fleet_helpers import preload, until

pytestmark = pytest.mark.integration

MODEL = "llama3.2"
CITIES = {"Paris", "Tokyo", "Lima", "Oslo"}


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(port=0, nats_url=nats_server.url, root="lc", sims=default_sims(2, time_scale=0.01))
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


@pytest.fixture
async def pool() -> AsyncIterator[dict[str, Any]]:
    """``async_client_kwargs`` giving LangChain's Ollama clients a connection pool that the test
    closes (they never close their own)."""
    async with httpx.AsyncHTTPTransport() as transport:
        yield {"transport": transport}


def started(fleet: LocalFleet, model: str) -> int:
    """Requests for ``model`` the simulated servers have begun (counted before any reply is sent)."""
    key = parse_name(model).key
    return sum(s.stats.per_model[key].started for s in fleet.sims if key in s.stats.per_model)


async def test_astream_chunks_join_to_the_answer(fleet: LocalFleet, pool: dict[str, Any]) -> None:
    llm = ChatOllama(async_client_kwargs=pool, base_url=fleet.url, model=MODEL, seed=5)
    before = started(fleet, MODEL)
    chunks = [c async for c in llm.astream("why is the sky blue?")]
    answer = await llm.ainvoke("why is the sky blue?")
    text = "".join(str(c.content) for c in chunks)
    assert len(chunks) > 2 and text == answer.content and len(text) > 20
    assert answer.response_metadata["model"] == MODEL and answer.response_metadata["done_reason"] == "stop"
    async with ollama.AsyncClient(host=fleet.sims[0].url) as direct:
        ref = await direct.chat(
            model=MODEL, messages=[{"role": "user", "content": "why is the sky blue?"}], options={"seed": 5}
        )
    assert text == ref.message.content  # the gateway relays one Ollama's answer verbatim
    assert started(fleet, MODEL) == before + 3  # two through the gateway, one direct


async def test_a_named_tool_is_called_and_its_result_answered(
    fleet: LocalFleet, pool: dict[str, Any]
) -> None:
    llm = ChatOllama(async_client_kwargs=pool, base_url=fleet.url, model=MODEL, seed=1).bind_tools(
        [get_weather]
    )
    question = messages.HumanMessage("Use get_weather: is it raining where I am?")
    call = await llm.ainvoke([question])
    assert isinstance(call, messages.AIMessage)
    assert [(c["name"], set(c["args"])) for c in call.tool_calls] == [("get_weather", {"city"})]
    assert call.tool_calls[0]["args"]["city"] in CITIES and call.tool_calls[0]["id"]
    result = tools.tool(get_weather).invoke(call.tool_calls[0])
    assert isinstance(result, messages.ToolMessage) and result.tool_call_id == call.tool_calls[0]["id"]
    reply = await llm.ainvoke([question, call, result])
    assert isinstance(reply, messages.AIMessage) and reply.tool_calls == [] and reply.content
    plain = await llm.ainvoke("hello there")  # tools offered, none named: a plain answer
    assert isinstance(plain, messages.AIMessage) and plain.tool_calls == [] and plain.content


async def test_a_model_without_tools_refuses_them(fleet: LocalFleet, pool: dict[str, Any]) -> None:
    async with ollama.AsyncClient(host=fleet.url) as client:
        assert (await client.pull("gemma3:4b")).status == "success"
    key = parse_name("gemma3:4b").key
    await until(fleet, lambda: bool(fleet.gateway and fleet.gateway.fleet.with_model(key)))
    llm = ChatOllama(async_client_kwargs=pool, base_url=fleet.url, model="gemma3:4b")
    with pytest.raises(ollama.ResponseError) as e:
        await llm.bind_tools([get_weather]).ainvoke("Use get_weather")
    assert e.value.status_code == 400 and "does not support tools" in e.value.error
    assert (await llm.ainvoke("hello")).content  # the same model without tools answers


async def test_embeddings(fleet: LocalFleet, pool: dict[str, Any]) -> None:
    emb = OllamaEmbeddings(async_client_kwargs=pool, base_url=fleet.url, model="all-minilm")
    before = started(fleet, "all-minilm")
    docs = await emb.aembed_documents(["a", "b", "a"])
    query = await emb.aembed_query("a")
    async with ollama.AsyncClient(host=fleet.url) as client:
        info = (await client.show("all-minilm")).modelinfo
    assert info is not None and info["bert.embedding_length"] == 384
    assert [len(v) for v in [*docs, query]] == [384] * 4
    assert docs[0] == docs[2] != docs[1]  # one request, one server: equal texts give equal vectors
    assert all(abs(math.hypot(*v) - 1) < 1e-6 for v in docs)
    assert started(fleet, "all-minilm") == before + 2


async def test_against_corral_up(nats_server: NatsServer, tmp_path: Path, pool: dict[str, Any]) -> None:
    async with corral_up(nats_server.url, "lcup", tmp_path / "corral-up.log", sims=2) as up:
        llm = ChatOllama(async_client_kwargs=pool, base_url=up.url, model=MODEL, seed=9)
        chunks = [c async for c in llm.astream("hello there")]
        assert len(chunks) > 2 and "".join(str(c.content) for c in chunks)
        streamed: Any = None
        async for chunk in llm.bind_tools([get_weather]).astream("call get_weather for me"):
            streamed = chunk if streamed is None else streamed + chunk
        assert [c["name"] for c in streamed.tool_calls] == ["get_weather"]
        assert streamed.tool_calls[0]["args"]["city"] in CITIES
        emb = OllamaEmbeddings(async_client_kwargs=pool, base_url=up.url, model="all-minilm")
        vectors = await emb.aembed_documents(["a"])
        assert len(vectors[0]) == 384
        loaded = {}
        for agent, url in up.backends.items():
            async with ollama.AsyncClient(host=url) as direct:
                loaded[agent] = {m.model for m in (await direct.ps()).models}
        assert any("llama3.2:latest" in m for m in loaded.values()), loaded
        assert any("all-minilm:latest" in m for m in loaded.values()), loaded
