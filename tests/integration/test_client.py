"""The direct NATS client: the same routing as the gateway, no HTTP."""

from __future__ import annotations

import asyncio
import time

import pytest
from corral.client import AsyncClient, Client, ResponseError
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload, until

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


async def _raw_reply_kinds(fleet: LocalFleet, body: dict[str, str | object]) -> list[dict[str, str]]:
    """Publish one request on an agent's direct subject as a bare NATS client; the reply headers."""
    import msgspec
    import nats
    from corral.protocol import headers as H
    from corral.protocol.names import parse_name
    from corral.protocol.subjects import Subjects

    nc = await nats.connect(fleet.nats_url)
    try:
        inbox = "cl.reply.raw." + nc.new_inbox().rsplit(".", 1)[-1]  # agents answer only under the root
        sub = await nc.subscribe(inbox)
        deadline = str(int((time.time() + 30) * 1000))
        headers = {
            H.REQUEST: "raw1",
            H.ENDPOINT: "/api/generate",
            H.MODEL: parse_name(str(body["model"])).token,
            H.DEADLINE: deadline,
        }
        agent = fleet.agents[0].id
        await nc.publish(
            Subjects("cl").agent_work(agent), msgspec.json.encode(body), reply=inbox, headers=headers
        )
        seen: list[dict[str, str]] = []
        while not seen or seen[-1].get(H.KIND) != H.END_KIND and seen[-1].get(H.END) != "1":
            msg = await sub.next_msg(timeout=10)
            if msg.headers:
                seen.append(dict(msg.headers))
        return seen
    finally:
        await nc.close()


async def test_a_quick_reply_claims_with_its_head_a_slow_one_claims_first(fleet: LocalFleet) -> None:
    from corral.protocol import headers as H

    quick = await _raw_reply_kinds(
        fleet, {"model": "llama3.2", "prompt": "q", "stream": False, "options": {"num_predict": 1}}
    )
    assert quick[0][H.KIND] == H.HEAD and quick[0][H.AGENT] == fleet.agents[0].id  # one message
    assert quick[0][H.REQUEST] == "raw1" and quick[0][H.END] == "1"
    # a reply that takes far longer than the claim's few milliseconds (a cold load of 5 GB, about
    # 30 ms here): the claim goes out first
    slow = await _raw_reply_kinds(fleet, {"model": "qwen3:8b", "prompt": "s", "stream": False})
    assert slow[0][H.KIND] == H.CLAIM and slow[0][H.AGENT] == fleet.agents[0].id
    assert slow[-1][H.KIND] == H.HEAD and H.AGENT not in slow[-1]


async def _loaded(url: str) -> set[str]:
    import ollama

    async with ollama.AsyncClient(host=url) as c:
        return {m.model or "" for m in (await c.ps()).models}


async def _seen_loaded_everywhere(fleet: LocalFleet, c: AsyncClient) -> None:
    assert c._planner is not None
    view = c._planner.fleet
    await until(fleet, lambda: len(view.loaded_on("qwen3:8b")) == len(fleet.agents))


async def test_an_unload_lets_the_model_go_on_every_agent(fleet: LocalFleet) -> None:
    """``keep_alive: 0`` with no prompt unloads the model wherever it is loaded, as through the
    gateway, not on the one agent a generate would go to."""
    async with AsyncClient(fleet.nats_url, root="cl") as c:
        await preload(fleet, "qwen3:8b")
        await _seen_loaded_everywhere(fleet, c)
        r = await c.generate("qwen3:8b", "", keep_alive=0)
        assert r["done"] and r["done_reason"] == "unload" and r["model"] == "qwen3:8b"
        for sim in fleet.sims:
            assert "qwen3:8b" not in await _loaded(sim.url)
        await preload(fleet, "qwen3:8b")
        await _seen_loaded_everywhere(fleet, c)
        streamed = [p async for p in await c.chat("qwen3:8b", [], keep_alive=0, stream=True)]
        assert [p["done_reason"] for p in streamed] == ["unload"]
        for sim in fleet.sims:
            assert "qwen3:8b" not in await _loaded(sim.url)


async def test_an_alias_and_a_conversation_route_as_through_the_gateway(fleet: LocalFleet) -> None:
    """The client reads the fleet's aliases, and each follow-up of a chat goes back to the agent
    that served its opening (its prompt cache), as the gateway routes them."""
    from tests.integration.cli_helpers import corral_ok

    await corral_ok("alias", "house-model", "llama3.2", "--nats", fleet.nats_url, "--root", "cl")
    try:
        async with AsyncClient(fleet.nats_url, root="cl") as c:
            assert c._policy is not None
            await c._policy.wait_for(lambda p: "house-model:latest" in p.aliases, timeout=5.0)
            r = await c.generate("house-model", "x", options={"num_predict": 2})
            assert r["done"]
            await preload(fleet, "llama3.2")  # warm everywhere again (an earlier test's loads may evict it)
            # each chat opens on a vendor of its own, and its follow-up names none
            for i, vendor in enumerate(("amd", "nvidia", "amd", "nvidia")):
                opening = [{"role": "user", "content": f"conversation {i}"}]
                body = {"model": "llama3.2", "messages": opening, "options": {"num_predict": 2}}
                before = [s.stats.finished for s in fleet.sims]
                await c.request("/api/chat", body, vendor=vendor, strict=True)
                (opened,) = [s for s, b in zip(fleet.sims, before, strict=True) if s.stats.finished > b]
                assert opened.config.vendor == vendor, i
                follow = [
                    *opening,
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "more"},
                ]
                assert c._planner is not None  # the follow-up once the client sees the slot free again
                await until(fleet, lambda: all(a.in_flight == 0 for a in c._planner.fleet.agents()))
                before = [s.stats.finished for s in fleet.sims]
                await c.chat("llama3.2", follow, options={"num_predict": 2})
                (served,) = [s for s, b in zip(fleet.sims, before, strict=True) if s.stats.finished > b]
                assert served.config.vendor == vendor, i
    finally:
        await corral_ok("alias", "--rm", "house-model", "--nats", fleet.nats_url, "--root", "cl")


async def test_strategy_and_priority_as_the_gateway_reads_its_headers(fleet: LocalFleet) -> None:
    body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 2}}
    async with AsyncClient(fleet.nats_url, root="cl") as c:
        for vendor in ("amd", "nvidia"):  # a vendor given as the strategy, as the header allows
            before = [s.stats.finished for s in fleet.sims]
            r = await c.request("/api/generate", body, strategy=vendor.upper(), strict=True, priority="batch")
            assert r["done"]
            (served,) = [s for s, b in zip(fleet.sims, before, strict=True) if s.stats.finished > b]
            assert served.config.vendor == vendor
        assert (await c.request("/api/generate", body, strategy="round-robin"))["done"]
        with pytest.raises(ResponseError) as e:
            await c.request("/api/generate", body, strategy="fastest")
        assert e.value.status_code == 400 and "unknown load-balancing strategy 'fastest'" in e.value.error
        with pytest.raises(ResponseError) as e:
            await c.request("/api/generate", body, priority="urgent")
        assert e.value.status_code == 400 and e.value.error.startswith("invalid X-Corral-Priority 'urgent'")


async def test_a_wrongly_typed_field_is_ollamas_400(fleet: LocalFleet) -> None:
    async with AsyncClient(fleet.nats_url, root="cl") as c:
        with pytest.raises(ResponseError) as e:
            await c.request("/api/generate", {"model": "llama3.2", "prompt": 5})
    assert e.value.status_code == 400
