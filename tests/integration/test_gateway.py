"""The request path end to end: official clients → gateway → NATS → agents → simulated Ollamas."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import nats
import ollama
import openai
import pytest
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims
from nats.aio.msg import Msg

from tests.integration.fleet_helpers import preload, until

pytestmark = pytest.mark.integration

MODEL = "llama3.2"


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> LocalFleet:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="gw",
        sims=default_sims(3, time_scale=0.01),  # nvidia, amd, nvidia
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={"queue_timeout_s": 5.0},
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


@pytest.fixture
async def client(fleet: LocalFleet) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=fleet.url) as c:
        yield c


def _shape(obj: object) -> object:
    """Keys and value types, recursively: what must match between the gateway and one Ollama."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items() if k not in ("created_at",)}
    if isinstance(obj, list):
        return [_shape(obj[0])] if obj else []
    return type(obj).__name__


async def test_ollama_client_methods_match_one_server(fleet: LocalFleet, client: ollama.AsyncClient) -> None:
    async with ollama.AsyncClient(host=fleet.sims[0].url) as direct:
        await _compare(client, direct)


async def _compare(client: ollama.AsyncClient, direct: ollama.AsyncClient) -> None:
    for call in (
        lambda c: c.generate(model=MODEL, prompt="why is the sky blue?", options={"seed": 1}),
        lambda c: c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"seed": 1}),
        lambda c: c.embed(model="all-minilm", input=["a", "b"]),
        lambda c: c.embeddings(model="all-minilm", prompt="a"),
        lambda c: c.show(MODEL),
    ):
        via, ref = await call(client), await call(direct)
        assert _shape(via.model_dump()) == _shape(ref.model_dump())
    gen = await client.generate(model=MODEL, prompt="why is the sky blue?", options={"seed": 7})
    ref = await direct.generate(model=MODEL, prompt="why is the sky blue?", options={"seed": 7})
    assert gen.response == ref.response and gen.model == MODEL and gen.done_reason == ref.done_reason


async def test_streaming_generate_and_chat(client: ollama.AsyncClient) -> None:
    parts = [p async for p in await client.generate(model=MODEL, prompt="count", stream=True)]
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert parts[-1].eval_count and parts[-1].eval_count >= len(parts) - 1
    chunks = [
        c
        async for c in await client.chat(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    ]
    assert chunks[-1].done and all(c.message.role == "assistant" for c in chunks)
    assert "".join(c.message.content for c in chunks)


async def test_list_and_ps_are_merged(fleet: LocalFleet, client: ollama.AsyncClient) -> None:
    listed = await client.list()
    names = [m.model for m in listed.models]
    assert len(names) == len(set(names)) and "llama3.2:latest" in names
    async with ollama.AsyncClient(host=fleet.sims[0].url) as one:
        direct = await one.list()
    assert {m.model for m in direct.models} <= set(names)
    ps = await client.ps()
    # one row per agent: a model loaded on three servers shows three times
    assert sum(1 for m in ps.models if m.model == "llama3.2:latest") == 3


async def test_requests_spread_over_agents(fleet: LocalFleet, client: ollama.AsyncClient) -> None:
    before = [s.stats.finished for s in fleet.sims]
    answers = await asyncio.gather(
        *(client.generate(model=MODEL, prompt=f"q{i}", options={"num_predict": 4}) for i in range(30))
    )
    assert all(a.done and a.response for a in answers)
    served = [s.stats.finished - b for s, b in zip(fleet.sims, before, strict=True)]
    # At least once each: one not claimed within the warm claim timeout (a loaded machine) goes to
    # the fleet queue, and its late claimant, told to drop it, may have finished four tokens first.
    assert sum(served) >= 30
    assert sum(1 for n in served if n > 0) >= 2, served


async def test_openai_client(fleet: LocalFleet) -> None:
    async with openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0) as oa:
        await _openai_calls(oa)


async def _openai_calls(oa: openai.AsyncOpenAI) -> None:
    r = await oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content and r.usage and r.usage.completion_tokens > 0 and r.model == MODEL
    stream = await oa.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks) and chunks[-1].usage
    c = await oa.completions.create(model=MODEL, prompt="once upon")
    assert c.choices[0].text
    e = await oa.embeddings.create(model="all-minilm", input=["x", "y"])
    assert len(e.data) == 2 and e.data[0].embedding
    models = await oa.models.list()
    assert "llama3.2:latest" in {m.id for m in models.data}
    with pytest.raises(openai.NotFoundError) as err:
        await oa.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "model 'no-such-model' not found" in str(err.value)


async def test_vendor_pins(fleet: LocalFleet, client: ollama.AsyncClient) -> None:
    amd = [s for s in fleet.sims if s.config.vendor == "amd"]
    before = sum(s.stats.finished for s in amd)
    for name in ("amd/llama3.2", "llama3.2@amd"):
        r = await client.generate(model=name, prompt="hi", options={"num_predict": 3})
        assert r.model == name  # echoed as the client sent it, pin and all
        parts = [
            p
            async for p in await client.chat(
                model=name, messages=[{"role": "user", "content": "x"}], stream=True
            )
        ]
        assert all(p.model == name for p in parts)
    assert sum(s.stats.finished for s in amd) - before == 4


async def test_strict_pin_never_leaks(fleet: LocalFleet) -> None:
    amd = [s for s in fleet.sims if s.config.vendor == "amd"]
    others = [s for s in fleet.sims if s.config.vendor != "amd"]
    before_amd, before_other = sum(s.stats.finished for s in amd), sum(s.stats.finished for s in others)
    pin = {"X-Load-Balancing-Strategy": "amd", "X-Enforce-Strategy": "true"}
    async with ollama.AsyncClient(host=fleet.url, headers=pin) as strict:
        await asyncio.gather(
            *(strict.generate(model=MODEL, prompt=f"{i}", options={"num_predict": 3}) for i in range(12))
        )
    # every request ran on AMD; on a loaded machine a claim later than the warm-claim wait can run
    # one a second time (its cancel comes after a 3-token answer), never on another vendor
    assert sum(s.stats.finished for s in amd) - before_amd >= 12
    assert sum(s.stats.finished for s in others) == before_other


async def test_a_strict_pin_to_a_vendor_without_the_model_says_which_is_missing(fleet: LocalFleet) -> None:
    """The model is there, only not on an agent of the vendor the request insists on: the 404 says
    so, rather than that the model does not exist."""
    pin = {"X-Load-Balancing-Strategy": "intel", "X-Enforce-Strategy": "true"}
    async with ollama.AsyncClient(host=fleet.url, headers=pin) as strict:
        with pytest.raises(ollama.ResponseError) as e:
            await strict.generate(model=MODEL, prompt="x")
    assert e.value.status_code == 404 and e.value.error == f"model '{MODEL}' not found on any intel agent"


async def test_x_corral_model_names_the_model_as_the_fleet_lists_it(fleet: LocalFleet) -> None:
    """Model names are case-insensitive: a request for ``LLAMA3.2`` is served by ``llama3.2:latest``,
    and the header says so (it echoed the request's spelling)."""
    body = {"model": "LLAMA3.2", "prompt": "x", "stream": False, "options": {"num_predict": 1}}
    async with aiohttp.ClientSession() as s, s.post(f"{fleet.url}/api/generate", json=body) as r:
        assert r.status == 200
        assert r.headers["x-corral-model"] == "llama3.2:latest"


async def test_unknown_model_and_bad_bodies(fleet: LocalFleet, client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        await client.generate(model="nope", prompt="x")
    assert e.value.status_code == 404 and e.value.error == "model 'nope' not found"
    with pytest.raises(ollama.ResponseError) as e:
        await client.embed(model="nope", input="x")
    assert e.value.error == 'model "nope" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as e:
        await client.show("nope")
    assert e.value.status_code == 404 and e.value.error == "model 'nope:latest' not found"
    with pytest.raises(ollama.ResponseError) as e:
        await client.push("nope", stream=False)
    assert e.value.status_code == 404 and e.value.error == "model 'nope:latest' not found"
    async with aiohttp.ClientSession() as s:
        async with s.post(fleet.url + "/api/chat", data=b"") as r:
            assert r.status == 400 and await r.json() == {"error": "missing request body"}
        async with s.post(fleet.url + "/api/chat", data=b"{not json") as r:
            assert r.status == 400 and "error" in await r.json()
        async with s.post(fleet.url + "/api/chat", json={"messages": []}) as r:
            assert r.status == 400 and await r.json() == {"error": "model is required"}
        async with s.post(fleet.url + "/api/copy", json={"destination": "x"}) as r:
            assert r.status == 400 and await r.json() == {"error": 'source "" is invalid'}
        async with s.delete(fleet.url + "/api/delete", json={}) as r:
            assert r.status == 400 and await r.json() == {"error": 'name "" is invalid'}
        async with s.post(fleet.url + "/api/generate", json={"model": "bad:name:", "prompt": "x"}) as r:
            assert r.status == 400 and await r.json() == {"error": "invalid model name"}
        async with s.get(fleet.url + "/api/nothing") as r:
            assert r.status == 404 and await r.text() == "404 page not found"
            assert r.headers["content-type"] == "text/plain"  # gin's, no charset
        async with s.post(fleet.url + "/api/tags") as r:
            assert r.status == 405 and await r.text() == "405 method not allowed"
            assert r.headers["content-type"] == "text/plain" and "GET" in r.headers["allow"]
        async with s.get(fleet.url + "/") as r:
            assert await r.text() == "Ollama is running"


async def test_wrong_methods_slashes_and_numbers_past_their_range_answer_as_ollama(fleet: LocalFleet) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/api/generate", "/api/chat", "/api/embed", "/v1/chat/completions"):
            for method in ("GET", "PUT", "DELETE"):
                async with s.request(method, fleet.url + path) as r:
                    assert r.status == 405 and await r.text() == "405 method not allowed", (method, path)
        async with s.post(fleet.url + "/api/generate/?x=1", allow_redirects=False) as r:
            assert r.status == 307 and r.headers["location"] == "/api/generate?x=1"
            assert "content-type" not in r.headers and await r.read() == b""
        async with s.get(fleet.url + "/api/tags/", allow_redirects=False) as r:  # gin: 301 for a GET
            assert r.status == 301 and r.headers["location"] == "/api/tags"
            assert await r.text() == '<a href="/api/tags">Moved Permanently</a>.\n\n'
        body = {"model": MODEL, "prompt": "hi", "stream": False}
        async with s.post(fleet.url + "/api/generate/", json=body) as r:  # followed, POST and body kept
            assert r.status == 200 and (await r.json())["done"]
        # a context past any model's is clamped to the trained one, as Ollama does
        body["options"] = {"num_ctx": 2**31 - 1, "num_predict": 2}
        async with s.post(fleet.url + "/api/generate", json=body) as r:
            assert r.status == 200 and (await r.json())["done"]
        # bytes that are not UTF-8 are read as Go reads them (U+FFFD), and the model is routed on
        async with s.post(
            fleet.url + "/api/generate",
            data=b'{"model": "llama3.2", "stream": false, "options": {"num_predict": 2}, "prompt": "a\xff\xfeb"}',
        ) as r:
            assert r.status == 200 and (await r.json())["done"], await r.text()
        # so is a lone surrogate escape (a JavaScript string cut in the middle of an emoji)
        for path, lone in (
            (
                "/api/chat",
                b'{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"a\\ud83d"}]}',
            ),
            (
                "/v1/chat/completions",
                b'{"model":"llama3.2","messages":[{"role":"user","content":"\\ude00b"}]}',
            ),
        ):
            async with s.post(fleet.url + path, data=lone) as r:
                assert r.status == 200, (path, await r.text())
        # a keep_alive past float's range is Ollama's 400 to word, never a 500 of the gateway
        async with s.post(
            fleet.url + "/api/generate", data=b'{"model": "llama3.2", "keep_alive": 1e400}'
        ) as r:
            assert r.status == 400 and "error" in await r.json()


async def test_a_body_ollama_reads_leniently_is_routed_and_served(fleet: LocalFleet) -> None:
    """Go's decoder matches keys ignoring case and leaves what follows the JSON value unread: a
    client that writes ``"Model"`` (a .NET one, say) or a stray byte after the body is served."""
    async with aiohttp.ClientSession() as s:
        body = b'{"Model": "llama3.2", "Prompt": "hi", "Stream": false, "Options": {"num_predict": 2}}'
        async with s.post(fleet.url + "/api/generate", data=body) as r:
            assert r.status == 200 and r.content_type == "application/json", await r.text()
            assert (await r.json())["done"] and r.headers["x-corral-model"] == "llama3.2:latest"
        body = b'{"model": "llama3.2", "messages": [], "stream": false}\n}'
        async with s.post(fleet.url + "/api/chat", data=body) as r:
            assert r.status == 200 and (await r.json())["done_reason"] == "load", await r.text()
        async with s.post(fleet.url + "/api/show", data=b'{"Model": "llama3.2"} x') as r:
            assert r.status == 200 and "model_info" in await r.json(), await r.text()
        body = b'{"MODEL": "llama3.2", "Messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
        async with s.post(fleet.url + "/v1/chat/completions", data=body) as r:
            assert r.status == 200 and (await r.json())["object"] == "chat.completion", await r.text()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b""),  # Go's decoder: EOF
        ("/v1/completions", b"  "),
        ("/v1/embeddings", b'{"model": "nope", "input": "x"}'),  # the embed handler's words
        ("/v1/chat/completions", b'{"model": "llama3.2", "messages": "x"'),
    ],
)
async def test_openai_errors_the_gateway_words_are_ollamas(fleet: LocalFleet, path: str, body: bytes) -> None:
    async with aiohttp.ClientSession() as http:
        answers = []
        for url in (fleet.sims[0].url, fleet.url):
            async with http.post(url + path, data=body) as r:
                answers.append((r.status, await r.json()))
    assert answers[1] == answers[0] and answers[0][0] in (400, 404)


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/chat", b'{"model":"llama3.2","messages":' + DEEP + b"}"),
        ("POST", "/api/generate", b'{"model":"llama3.2","prompt":"hi","x":' + DEEP + b"}"),
        ("POST", "/api/embed", b'{"model":"llama3.2","input":' + DEEP + b"}"),
        ("POST", "/v1/chat/completions", b'{"model":"llama3.2","messages":' + DEEP + b"}"),
        ("POST", "/api/show", b'{"model":"llama3.2","x":' + DEEP + b"}"),
        ("POST", "/api/pull", b'{"model":"llama3.2","x":' + DEEP + b"}"),
        ("POST", "/api/create", b'{"model":"x","from":"llama3.2","x":' + DEEP + b"}"),
        ("POST", "/api/copy", b'{"source":"llama3.2","x":' + DEEP + b"}"),
        ("DELETE", "/api/delete", b'{"model":"nothing","x":' + DEEP + b"}"),
        ("POST", "/v1/batches", b'{"input_file_id":"file-x","x":' + DEEP + b"}"),
        ("POST", "/api/corral/unload", b'{"model":"llama3.2","x":' + DEEP + b"}"),
    ],
)
async def test_a_body_nested_past_the_decoders_depth_is_400(
    fleet: LocalFleet, method: str, path: str, body: bytes
) -> None:
    async with aiohttp.ClientSession() as s, s.request(method, fleet.url + path, data=body) as r:
        assert r.status == 400, await r.text()
        error = (await r.json())["error"]
        assert "exceeded max depth" in (error["message"] if path.startswith("/v1/") else error)


async def test_body_larger_than_nats_payload(fleet: LocalFleet, client: ollama.AsyncClient) -> None:
    assert fleet.gateway is not None and fleet.gateway.nc is not None
    big = "word " * (fleet.gateway.nc.max_payload // 4)  # ~1.25x the payload limit
    r = await client.generate(model=MODEL, prompt=big, options={"num_predict": 2, "num_ctx": 2_000_000})
    assert r.done and r.prompt_eval_count and r.prompt_eval_count > 100_000


async def test_client_disconnect_cancels_on_backend(nats_server: NatsServer) -> None:
    # one backend whose replies run for minutes unless cancelled
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="disc",
        sims=default_sims(1, time_scale=0.01, reply_tokens=(100_000, 100_000)),
        registry=None,
        aggregator=None,
    )
    async with LocalFleet(options) as fleet:
        sim = fleet.sims[0]
        async with aiohttp.ClientSession() as s:
            async with s.post(fleet.url + "/api/generate", json={"model": MODEL, "prompt": "long"}) as r:
                assert r.status == 200
                line = await r.content.readline()
                assert json.loads(line)["done"] is False
            # leaving the block closes the connection mid-stream
        await sim.stats.wait_for(lambda st: st.cancelled == 1, timeout=5)
        assert sim.stats.finished == 0


async def test_without_a_registry_a_pull_onto_several_agents_is_refused_not_done_on_one(
    nats_server: NatsServer,
) -> None:
    options = FleetOptions(
        port=0, nats_url=nats_server.url, root="noreg", sims=default_sims(2, time_scale=0.01), registry=None
    )
    async with LocalFleet(options) as fleet, aiohttp.ClientSession() as s:
        body = {"model": "mistral", "stream": False}
        for replicas in ("all", "2"):
            async with s.post(
                fleet.url + "/api/pull", json=body, headers={"X-Corral-Replicas": replicas}
            ) as r:
                assert r.status == 503
                assert await r.json() == {
                    "error": f"no registry is running: a pull onto {replicas} agents needs one"
                }
        assert all(sim.ctx.catalog.get("mistral") is None for sim in fleet.sims)
        async with s.post(
            fleet.url + "/api/pull", json=body
        ) as r:  # one copy: the agent the registry would pick
            assert r.status == 200 and await r.json() == {"status": "success"}
        async with s.post(fleet.url + "/api/pull", json=body, headers={"X-Corral-Replicas": "01"}) as r:
            assert r.status == 200  # one copy, however spelt


async def test_unload_reaches_every_agent(fleet: LocalFleet) -> None:
    """And its answer says which agent's answer it is and which model, as every model call does."""
    await preload(fleet, "qwen3:8b")
    body = {"model": "qwen3:8b", "prompt": "", "keep_alive": 0, "stream": False}
    async with aiohttp.ClientSession() as s, s.post(fleet.url + "/api/generate", json=body) as r:
        assert r.status == 200
        assert (await r.json())["done_reason"] == "unload"
        assert r.headers["X-Corral-Model"] == "qwen3:8b" and r.headers["X-Corral-Route"] == "direct"
        assert r.headers["X-Corral-Agent"] in {a.id for a in fleet.agents}
    assert fleet.gateway is not None
    for a in fleet.agents:
        a._wake.refresh.set()
    await until(fleet, lambda: not fleet.gateway.fleet.loaded_on("qwen3:8b"))  # type: ignore[union-attr]


async def test_an_unload_of_a_pinned_name_unloads_that_vendors_copies(fleet: LocalFleet) -> None:
    """`ollama stop amd/qwen3:8b`: the AMD agent lets it go, the NVIDIA ones keep theirs; asked again
    when no AMD agent has it loaded, the pin is a preference, and every copy goes."""
    await preload(fleet, "qwen3:8b")
    gw = fleet.gateway
    assert gw is not None
    vendors = {a.id: a.vendor for a in fleet.agents}
    assert sorted(vendors.values()) == ["amd", "nvidia", "nvidia"]

    def loaded_vendors() -> list[str]:
        return sorted(vendors[a.id] for a in gw.fleet.loaded_on("qwen3:8b"))

    async with aiohttp.ClientSession() as s:
        body = {"model": "amd/qwen3:8b", "prompt": "", "keep_alive": 0, "stream": False}
        async with s.post(fleet.url + "/api/generate", json=body) as r:
            assert r.status == 200 and (await r.json())["done_reason"] == "unload"
            assert vendors[r.headers["X-Corral-Agent"]] == "amd"
        for a in fleet.agents:
            a._wake.refresh.set()
        await until(fleet, lambda: loaded_vendors() == ["nvidia", "nvidia"])
        async with s.post(fleet.url + "/api/generate", json=body) as r:
            assert r.status == 200 and (await r.json())["done_reason"] == "unload"
        for a in fleet.agents:
            a._wake.refresh.set()
        await until(fleet, lambda: not loaded_vendors())


async def test_a_keep_alive_on_a_request_shows_in_ps_without_waiting_for_a_refresh(
    nats_server: NatsServer,
) -> None:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="gwka",
        sims=default_sims(1, time_scale=0.0),
        agent={"refresh_s": 3600.0},  # only what a request makes the agent re-read can show
    )
    async with LocalFleet(options) as fleet, ollama.AsyncClient(host=fleet.url) as c:
        await preload(fleet, MODEL)
        assert fleet.gateway is not None
        gw = fleet.gateway

        def expires() -> str:
            return next(m.expires_at for a in gw.fleet.agents() for m in a.loaded if m.name.startswith(MODEL))

        before = expires()
        await c.generate(model=MODEL, prompt="hi", keep_alive=-1, options={"num_predict": 1})
        await until(fleet, lambda: expires() != before and expires()[:2] == "23", what="forever")
        await c.generate(model=MODEL, prompt="hi", keep_alive=0, options={"num_predict": 1})
        await until(fleet, lambda: not gw.fleet.loaded_on(MODEL), what="unloaded after its reply")


async def test_strategy_header(fleet: LocalFleet) -> None:
    # round_robin through direct subjects: 6 requests land 2, 2, 2 on the three agents
    before = [s.stats.finished for s in fleet.sims]
    async with ollama.AsyncClient(host=fleet.url, headers={"X-Load-Balancing-Strategy": "round_robin"}) as c:
        for i in range(6):
            await c.generate(model=MODEL, prompt=f"rr{i}", options={"num_predict": 1})
    assert [s.stats.finished - b for s, b in zip(fleet.sims, before, strict=True)] == [2, 2, 2]
    async with aiohttp.ClientSession() as s:
        headers = {"X-Load-Balancing-Strategy": "fastest-please"}
        async with s.post(fleet.url + "/api/generate", json={"model": MODEL}, headers=headers) as r:
            assert r.status == 400 and "fastest-please" in (await r.json())["error"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/show", b"{"),
        ("POST", "/api/show", b'{"model": 5}'),
        ("POST", "/api/show", b"[1, 2]"),
        ("POST", "/api/show", b"null"),  # Go leaves the struct empty: no model
        ("DELETE", "/api/delete", b"null"),
        ("POST", "/api/show", b'{"model": "\xffnope"}'),
        ("POST", "/api/pull", b'{"model": '),
        ("POST", "/api/pull", b"{}"),  # no name: an invalid one
        ("POST", "/api/pull", b'{"Model": "x/y/z/w", "STREAM": false}'),  # keys in any case name fields
        ("POST", "/api/pull", b'{"name": true}'),
        ("POST", "/api/pull", b'{"model": "llama3.2", "stream": "yes"}'),
        ("POST", "/api/pull", b'{"model": "nope-\xff", "x": "\xff"}'),  # invalid UTF-8, read as Go does
        ("POST", "/api/show", b'{"model": "llama3.2", "verbose": 1}'),
        ("POST", "/api/push", b'{"model": ["x"]}'),
        ("POST", "/api/copy", b'{"source": 5, "destination": "x"}'),
        ("POST", "/api/copy", b'{"name": 1}'),  # no field of Go's CopyRequest: no source
        ("DELETE", "/api/delete", b'{"model":'),
        ("DELETE", "/api/delete", b'{"model": {}}'),
    ],
)
async def test_a_management_body_go_cannot_decode_is_refused_in_ollamas_words(
    fleet: LocalFleet, method: str, path: str, body: bytes
) -> None:
    """The gateway decides these itself, before any Ollama sees them: it words them as one does."""
    async with aiohttp.ClientSession() as http:
        answers = []
        for url in (fleet.sims[0].url, fleet.url):
            async with http.request(method, url + path, data=body) as r:
                answers.append((r.status, await r.json()))
    assert answers[1] == answers[0]


@pytest.mark.parametrize(
    ("method", "path", "redirected"),
    [("POST", "/api/chat", True), ("GET", "/api/tags", True), ("HEAD", "/api/tags", True)]
    + [("GET", "/api/chat", False), ("DELETE", "/api/chat", False), ("POST", "/api/tags", False)],
)
async def test_a_trailing_slash_is_redirected_as_ollamas_router_does(
    fleet: LocalFleet, method: str, path: str, redirected: bool
) -> None:
    """gin's redirect, to a route of the request's own method only (else 404): 301 for a GET with
    Go's small HTML body, 307 (method and body kept) for the rest, the query kept and the location
    relative; the gateway answers as a lone Ollama (here its simulator) does."""
    answers = []
    async with aiohttp.ClientSession() as http:
        for url in (fleet.sims[0].url, fleet.url):
            async with http.request(method, url + path + "/?x=1", allow_redirects=False) as r:
                answers.append(
                    (r.status, r.headers.get("Location"), r.headers.get("Content-Type"), await r.read())
                )
    assert answers[1] == answers[0]
    status, location, kind, body = answers[0]
    if not redirected:
        assert (status, body) == (404, b"404 page not found")
        return
    assert status == (301 if method == "GET" else 307) and location == path + "?x=1"
    assert (kind is not None, body != b"") == (method in ("GET", "HEAD"), method == "GET")


async def test_a_trailing_slash_after_a_route_with_a_parameter_is_redirected_too(fleet: LocalFleet) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(fleet.url + "/v1/models/llama3.2:latest/", allow_redirects=False) as r:
            assert r.status == 301 and r.headers["Location"] == "/v1/models/llama3.2:latest"


async def test_loads_and_unloads_are_no_requests_in_the_fleets_rates(
    fleet: LocalFleet, nats_server: NatsServer
) -> None:
    """A preload (an empty prompt) and an unload take seconds of loading and generate nothing: as
    requests they would fill the rates' TTFT with load times. Only the request that ran counts."""
    nc = await nats.connect(nats_server.url)
    events: list[dict[str, object]] = []
    got = asyncio.Event()

    async def on_event(msg: Msg) -> None:
        events.append(event := json.loads(msg.data))
        if event["model"] == "llama3.2:latest":
            got.set()

    await nc.subscribe(Subjects("gw").event("request"), cb=on_event)
    await nc.flush()
    try:
        async with ollama.AsyncClient(host=fleet.url) as c:
            await c.generate(model="qwen3:8b", prompt="", keep_alive=-1)  # a load
            await c.generate(model="qwen3:8b", prompt="", keep_alive=0)  # an unload
            await c.generate(model=MODEL, prompt="counted", options={"num_predict": 3})
        await asyncio.wait_for(got.wait(), 10)  # each event goes out as its answer ends: the load's
        await nc.flush()  # and the unload's before the counted request was sent
    finally:
        await nc.close()
    assert [(e["model"], e["status"]) for e in events] == [("llama3.2:latest", 200)], events


async def test_a_model_made_under_a_vendors_name_is_refused_before_any_agent_makes_it(
    fleet: LocalFleet,
) -> None:
    """`ollama cp llama3.2 nvidia/bar` would make a model no request could reach (`nvidia/bar`
    reads as a vendor pin): refused with how to name it; with its host it is made and reached."""
    async with ollama.AsyncClient(host=fleet.url) as c:
        for make in (
            c.copy(MODEL, "nvidia/bar"),
            c.create(model="AMD/bar", from_=MODEL, system="hi", stream=False),
        ):
            with pytest.raises(ollama.ResponseError) as refused:
                await make
            assert refused.value.status_code == 400
            assert "would be read as a vendor pin here" in refused.value.error
            assert "registry.ollama.ai/" in refused.value.error
        assert not any(
            m.model and m.model.split("/")[0].lower() in ("nvidia", "amd") for m in (await c.list()).models
        )
        await c.copy(MODEL, "registry.ollama.ai/nvidia/bar")
        r = await c.generate(model="registry.ollama.ai/nvidia/bar", prompt="hi", options={"num_predict": 2})
        assert r.done
        await c.delete("registry.ollama.ai/nvidia/bar")
