"""The direct NATS client: the same routing as the gateway, no HTTP."""

from __future__ import annotations

import asyncio

import pytest

from services.client import AsyncClient, Client, ResponseError
from services.runtime.natsserver import NatsServer
from services.up import FleetOptions, LocalFleet, default_sims
from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> LocalFleet:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="cl",
        sims=default_sims(2, time_scale=0.01),
        agent={"refresh_s": 0.5},
    )
    async with LocalFleet(options) as f:
        await preload(f, "llama3.2")
        yield f


async def test_async_client(fleet: LocalFleet) -> None:
    async with AsyncClient(fleet.nats_url, root="cl") as c:
        r = await c.generate("llama3.2", "why?", options={"seed": 3, "num_predict": 5})
        assert r["done"] and r["model"] == "llama3.2" and r["response"]
        parts = [p async for p in await c.chat("llama3.2", [{"role": "user", "content": "hi"}], stream=True)]
        assert parts[-1]["done"] and all(p["message"]["role"] == "assistant" for p in parts)
        e = await c.embed("all-minilm", ["a", "b"])
        assert len(e["embeddings"]) == 2
        pinned = await c.generate("amd/llama3.2", "x", options={"num_predict": 2})
        assert pinned["model"] == "amd/llama3.2"
        v1 = await c.request(
            "/v1/chat/completions", {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}
        )
        assert v1["object"] == "chat.completion"
        with pytest.raises(ResponseError) as err:
            await c.generate("missing-model", "x")
        assert err.value.status_code == 404 and err.value.error == "model 'missing-model' not found"


async def test_same_answer_as_the_gateway(fleet: LocalFleet) -> None:
    import ollama

    async with ollama.AsyncClient(host=fleet.url) as http:
        via_http = await http.generate(model="llama3.2", prompt="same", options={"seed": 9})
    async with AsyncClient(fleet.nats_url, root="cl") as c:
        direct = await c.generate("llama3.2", "same", options={"seed": 9})
    assert direct["response"] == via_http.response


async def test_sync_client(fleet: LocalFleet) -> None:
    def run() -> tuple[dict[str, object], list[dict[str, object]]]:
        with Client(fleet.nats_url, root="cl") as c:
            one = c.generate("llama3.2", "hello", options={"num_predict": 3})
            many = list(c.generate("llama3.2", "hello", stream=True, options={"num_predict": 3}))
            return one, many

    one, many = await asyncio.to_thread(run)
    assert one["done"] and many[-1]["done"] and len(many) >= 2
