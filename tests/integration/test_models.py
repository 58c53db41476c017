"""Model management through the gateway, and a full fleet answering Ollama's 503 after the deadline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import ollama
import pytest
from corral.protocol.errors import BUSY_MESSAGE
from corral.protocol.names import parse_name
from corral.runtime.natsserver import NatsServer
from corral.runtime.workqueue import depths
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload, until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="models",
        sims=default_sims(2, time_scale=0.001),
        agent={"refresh_s": 30.0, "heartbeat_s": 1.0},  # refreshes here come from the changes themselves
    )
    async with LocalFleet(options) as f:
        yield f


@pytest.fixture
async def client(fleet: LocalFleet) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=fleet.url) as c:
        yield c


def _holders(fleet: LocalFleet, name: str) -> list[str]:
    assert fleet.gateway is not None
    return sorted(a.id for a in fleet.gateway.fleet.with_model(parse_name(name).key))


async def test_pull_streams_progress_and_lands_on_one_agent(
    fleet: LocalFleet, client: ollama.AsyncClient
) -> None:
    assert _holders(fleet, "gemma3:4b") == []
    statuses = [p.status async for p in await client.pull("gemma3:4b", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert any(s and s.startswith("pulling ") and s != "pulling manifest" for s in statuses)
    await until(fleet, lambda: len(_holders(fleet, "gemma3:4b")) == 1)
    listed = await client.list()
    assert "gemma3:4b" in {m.model for m in listed.models}
    # a second pull refreshes where it already is instead of making another copy
    r = await client.pull("gemma3:4b")
    assert r.status == "success"
    assert len(_holders(fleet, "gemma3:4b")) == 1


async def test_a_vendor_pinned_name_shows_and_pulls_as_ollama_run_asks(
    fleet: LocalFleet, client: ollama.AsyncClient
) -> None:
    """``ollama run amd/llama3.2`` shows the model first and pulls it on a 404: a pinned name shows
    the model (from an agent of that vendor) and pulls onto that vendor's agents."""
    assert fleet.gateway is not None
    vendors = {a.id: a.vendor for a in fleet.gateway.fleet.agents()}
    assert sorted(vendors.values()) == ["amd", "nvidia"]
    plain = await client.show("llama3.2")
    for name in ("amd/llama3.2", "llama3.2@amd", "nvidia/llama3.2:latest"):
        shown = await client.show(name)
        assert shown.details == plain.details and shown.modelfile == plain.modelfile, name
    with pytest.raises(ollama.ResponseError) as e:
        await client.show("amd/no-such-model")
    assert (e.value.status_code, e.value.error) == (404, "model 'no-such-model:latest' not found")
    assert _holders(fleet, "mistral") == []
    assert (await client.pull("amd/mistral")).status == "success"
    await until(fleet, lambda: len(_holders(fleet, "mistral")) == 1)
    assert [vendors[a] for a in _holders(fleet, "mistral")] == ["amd"]
    await client.delete("mistral")
    await until(fleet, lambda: _holders(fleet, "mistral") == [])


async def test_the_merged_list_keeps_what_each_ollama_says_of_a_model(fleet: LocalFleet) -> None:
    """Newer Ollamas list each model's capabilities; the fleet's list keeps them, and leaves out
    what no Ollama gave (an entry keeps Ollama's six detail keys, no more)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(fleet.sims[0].url + "/api/tags") as r:
            direct = {m["model"]: m for m in (await r.json())["models"]}
        async with http.get(fleet.url + "/api/tags") as r:
            merged = {m["model"]: m for m in (await r.json())["models"]}
    assert direct and set(direct) <= set(merged)
    for name, entry in direct.items():
        assert merged[name]["capabilities"] == entry["capabilities"], name
        assert merged[name]["details"].keys() == entry["details"].keys(), name
        assert "remote_model" not in merged[name]
    assert any("embedding" in m["capabilities"] for m in merged.values())


async def test_pull_unknown_model_is_ollamas_error(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        await client.pull("no-such-model-anywhere")
    assert e.value.error == "pull model manifest: file does not exist"  # Ollama's own words


async def test_copy_and_delete_answer_as_ollama_does_an_empty_200_with_no_content_type(
    fleet: LocalFleet,
) -> None:
    async with aiohttp.ClientSession() as http:
        for url, name in ((fleet.sims[0].url, "bare:v0"), (fleet.url, "bare:v1")):  # Ollama, then Corral
            copy = {"source": "llama3.2", "destination": name}
            async with http.post(url + "/api/copy", json=copy) as r:
                assert (r.status, await r.read(), r.headers.get("Content-Type")) == (200, b"", None), url
            if url == fleet.url:
                await until(fleet, lambda: bool(_holders(fleet, "bare:v1")))
            async with http.delete(url + "/api/delete", json={"model": name}) as r:
                assert (r.status, await r.read(), r.headers.get("Content-Type")) == (200, b"", None), url


async def test_copy_then_delete_reach_every_holder(fleet: LocalFleet, client: ollama.AsyncClient) -> None:
    both = _holders(fleet, "llama3.2")
    assert len(both) == 2  # every default simulator ships llama3.2
    await client.copy("llama3.2", "mine:v1")
    await until(fleet, lambda: _holders(fleet, "mine:v1") == both)
    shown = await client.show("mine:v1")
    assert shown.details and shown.details.family == "llama"
    await client.delete("mine:v1")
    await until(fleet, lambda: _holders(fleet, "mine:v1") == [])
    with pytest.raises(ollama.ResponseError) as e:
        await client.delete("mine:v1")
    assert e.value.status_code == 404 and e.value.error == "model 'mine:v1' not found"
    with pytest.raises(ollama.ResponseError) as e:
        await client.copy("nothing-here", "x")
    assert e.value.status_code == 404


async def test_create_from_an_existing_model_lands_wherever_its_base_is(
    fleet: LocalFleet, client: ollama.AsyncClient
) -> None:
    both = _holders(fleet, "llama3.2")
    async with ollama.AsyncClient(host=fleet.sims[0].url) as lone:  # what one Ollama streams for it
        alone = [
            p.status
            async for p in await lone.create("pirate-alone", from_="llama3.2", system="Arr.", stream=True)
        ]
        await lone.delete("pirate-alone")
    assert alone[-2:] == ["writing manifest", "success"] and len(alone) > 2, alone  # its layers first
    statuses = [
        p.status async for p in await client.create("pirate", from_="llama3.2", system="Arr.", stream=True)
    ]
    assert statuses == alone
    await until(fleet, lambda: _holders(fleet, "pirate") == both)
    shown = await client.show("pirate")
    assert "Arr." in (shown.modelfile or "")
    r = await client.generate(model="pirate", prompt="ahoy", options={"num_predict": 3})
    assert r.done and r.model == "pirate"
    # a base only the last agent has: the create runs there, not on the first agent
    last = both[-1]
    vendor = next(a.vendor for a in fleet.gateway.fleet.agents() if a.id == last)  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as s:
        pulled = {"model": "mistral", "stream": False}
        async with s.post(fleet.url + "/api/pull", json=pulled, headers={"X-Corral-Vendor": vendor}) as p:
            assert p.status == 200
    await until(fleet, lambda: _holders(fleet, "mistral") == [last])
    done = await client.create("sage", from_="mistral", system="Be wise.")  # stream off: one object
    assert done.status == "success"
    await until(fleet, lambda: _holders(fleet, "sage") == [last])
    # a base nobody has: one agent pulls it first, as Ollama does, and creates there; one no
    # registry offers fails as that pull does
    first = min(a.id for a in fleet.gateway.fleet.agents())  # type: ignore[union-attr]
    assert (await client.create("gem-brief", from_="gemma3:4b", system="Brief.")).status == "success"
    await until(fleet, lambda: _holders(fleet, "gem-brief") == _holders(fleet, "gemma3:4b") == [first])
    with pytest.raises(ollama.ResponseError) as e:
        await client.create("nobody", from_="not-in-the-fleet")
    assert (e.value.status_code, e.value.error) == (500, "pull model manifest: file does not exist")


async def test_a_streamed_quantize_shows_its_progress_and_its_error(
    fleet: LocalFleet, client: ollama.AsyncClient
) -> None:
    """A create runs on every holder of its base; the client sees one holder's progress (as one
    Ollama streams it), then one success once every holder has answered, or Ollama's error."""
    parts = [
        p async for p in await client.create("minilm-q4", from_="all-minilm", quantize="q4_K_M", stream=True)
    ]
    quantizing = [p for p in parts if p.status == "quantizing F16 model to Q4_K_M"]
    assert len(quantizing) == 10, [p.status for p in parts]
    done = [p.completed or 0 for p in quantizing]
    assert done == sorted(done) and done[-1] == quantizing[-1].total and done[0] < done[-1]
    assert [p.status for p in parts].count("success") == 1 and parts[-1].status == "success"
    await until(fleet, lambda: _holders(fleet, "minilm-q4") == _holders(fleet, "all-minilm"))
    await client.delete("minilm-q4")
    with pytest.raises(ollama.ResponseError) as e:
        async for _ in await client.create("bad-q", from_="llama3.2", quantize="q4_K_M", stream=True):
            pass
    assert e.value.error == "quantization is only supported for F16 and F32 models"
    for bad in ("bad:name:", "a:b:c"):  # refused before any progress, with Ollama's status
        with pytest.raises(ollama.ResponseError) as e:
            async for _ in await client.create(bad, from_="llama3.2", stream=True):
                pass
        assert e.value.status_code == 400, bad


@pytest.mark.parametrize("fleet_queue", [True, False], ids=["fleet-queue", "agent-queue"])
async def test_full_fleet_answers_503_after_the_queue_deadline(
    nats_server: NatsServer, fleet_queue: bool
) -> None:
    # replies long enough to hold their slot for the whole test
    sim = default_sims(1, time_scale=1.0, num_parallel=1, reply_tokens=(100_000, 100_000))[0]
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=f"full{int(fleet_queue)}",
        sims=[sim],
        agent={"max_queue": 1, "heartbeat_s": 1.0},
        gateway={"queue_timeout_s": 1.0, "queue": fleet_queue},
    )
    async with LocalFleet(options) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, "llama3.2")
        body = {"model": "llama3.2", "prompt": "long", "options": {"num_predict": 100_000}}
        # one request runs, one waits (in the fleet-wide queue, or in the agent's own): the fleet is full
        running = await s.post(fleet.url + "/api/generate", json=body)
        assert running.status == 200
        assert fleet.gateway is not None and fleet.gateway.nc is not None
        nc, subjects = fleet.gateway.nc, fleet.gateway.subjects
        nudges = await nc.subscribe(f"{subjects.root}.queued.>")  # published after each enqueue
        queued = asyncio.ensure_future(s.post(fleet.url + "/api/generate", json=body))
        if fleet_queue:
            await nudges.next_msg(timeout=10)
            assert sum((await depths(nc, subjects)).values()) == 1
            async with s.get(fleet.url + "/api/status") as r:  # the wait is visible per model
                st = await r.json()
            assert st["queue"] == {"llama3.2:latest": 1} and st["totals"]["waiting"] == 1
        else:
            agent_id = fleet.agents[0].id
            await until(fleet, lambda: fleet.gateway.fleet.get(agent_id).queued == 1)  # type: ignore[union-attr]
        async with s.post(fleet.url + "/api/generate", json={**body, "stream": False}) as r:
            assert r.status == 503
            assert await r.json() == {"error": BUSY_MESSAGE}
        async with s.post(
            fleet.url + "/v1/chat/completions",
            json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
        ) as r:
            assert r.status == 503
            assert (await r.json())["error"]["message"] == BUSY_MESSAGE
        running.close()
        (await queued).close()


async def test_an_unload_leaves_the_merged_ps_at_once(fleet: LocalFleet, client: ollama.AsyncClient) -> None:
    """``keep_alive: 0`` through the gateway (``ollama stop``): the agent publishes that the model is
    gone before the answer ends, so the /api/ps that follows no longer lists it — as with one
    Ollama — not at the agents' next periodic read of their Ollama (30 s here)."""
    await preload(fleet, "llama3.2")
    assert "llama3.2:latest" in [m.model for m in (await client.ps()).models]
    r = await client.generate(model="llama3.2", prompt="", keep_alive=0)
    assert r.done_reason == "unload"
    assert "llama3.2:latest" not in [m.model for m in (await client.ps()).models]


async def test_a_cold_load_is_in_the_merged_ps_when_its_answer_ends(
    fleet: LocalFleet, client: ollama.AsyncClient
) -> None:
    """A request that loaded its model: the agent reads its Ollama again and publishes the runner
    before the answer ends, so the /api/ps that follows lists it, as one Ollama's does."""
    assert "qwen3:8b" not in [m.model for m in (await client.ps()).models]
    await client.generate(model="qwen3:8b", prompt="hi", options={"num_predict": 1})
    assert "qwen3:8b" in [m.model for m in (await client.ps()).models]


async def test_a_request_with_keep_alive_0_leaves_the_merged_ps_when_it_ends(
    fleet: LocalFleet, client: ollama.AsyncClient
) -> None:
    """``keep_alive: 0`` with a prompt: its runner ends with it, and the answer ends after the
    agent published so."""
    await preload(fleet, "llama3.2")  # on both agents
    r = await client.generate(model="llama3.2", prompt="hi", keep_alive=0, options={"num_predict": 1})
    assert r.done_reason != "unload"  # a request served, not an unload
    assert [m.model for m in (await client.ps()).models] == ["llama3.2:latest"]  # the other's


async def test_a_runner_leaves_the_merged_ps_when_its_keep_alive_runs_out(
    fleet: LocalFleet, client: ollama.AsyncClient
) -> None:
    """The agent reads its Ollama again just after the soonest expiry its last reading shows, not
    at its next periodic read (30 s here)."""
    await client.generate(model="llama3.2", prompt="hi", keep_alive="1000s", options={"num_predict": 1})
    assert "llama3.2:latest" in [m.model for m in (await client.ps()).models]  # 1 s at this time scale
    assert fleet.gateway is not None
    view, key = fleet.gateway.fleet, parse_name("llama3.2").key
    await until(fleet, lambda: not view.loaded_on(key), timeout=10.0)


@pytest.mark.parametrize("through", ["the registry", "one agent"])
async def test_a_model_is_usable_the_moment_its_pull_says_success(
    fleet: LocalFleet, client: ollama.AsyncClient, through: str
) -> None:
    """The agent publishes what it has on disk before its pull's last line goes out, so the very
    next request (and /api/tags) finds the model — as with one Ollama."""
    name = "mistral" if through == "the registry" else "nomic-embed-text"
    if through == "one agent":
        assert fleet.registry is not None
        await fleet.registry.stop()  # no registry: the gateway sends the pull to one agent itself
    last = [p.status async for p in await client.pull(name, stream=True)][-1]
    assert last == "success"
    assert any(m.model.startswith(name) for m in (await client.list()).models)
    r = await client.embed(model=name, input="at once")
    assert r.embeddings


async def test_a_create_whose_client_left_still_finishes_on_every_holder(nats_server: NatsServer) -> None:
    """The holders stay alike: a client that stops reading a streamed create's progress does not cut
    it short on the agents (a quantisation here, 10 steps over about half a second)."""
    big = {"name": "big-f16:latest", "size_gb": 20.0, "parameter_size": "10B", "quantization": "F16"}
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="models-left",
        sims=default_sims(2, time_scale=0.05, models=[big]),
        agent={"heartbeat_s": 1.0},
    )
    async with LocalFleet(options) as fleet, aiohttp.ClientSession() as s:
        body = {"model": "big-q4", "from": "big-f16", "quantize": "q4_K_M"}
        async with s.post(fleet.url + "/api/create", json=body) as r:
            assert r.status == 200
            first = json.loads(await r.content.readline())
            assert first["status"] == "quantizing F16 model to Q4_K_M" and first["completed"] < first["total"]
        # the connection is closed here, with nine steps to go
        holders = _holders(fleet, "big-f16")
        assert len(holders) == 2
        await until(fleet, lambda: _holders(fleet, "big-q4") == holders, what="the create on both holders")


async def test_a_streamed_create_ends_in_words_when_the_gateway_stops(nats_server: NatsServer) -> None:
    """At the end of the gateway's grace a create still under way ends with the stop's line, as
    every streamed answer does, not cut off by the server."""
    big = {"name": "big-f16:latest", "size_gb": 20.0, "parameter_size": "10B", "quantization": "F16"}
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="models-stop",
        sims=default_sims(1, time_scale=0.5, models=[big]),  # the quantisation takes 5 s
        agent={"heartbeat_s": 1.0},
    )
    async with LocalFleet(options) as fleet, aiohttp.ClientSession() as s:
        assert fleet.gateway is not None
        body = {"model": "big-q4", "from": "big-f16", "quantize": "q4_K_M"}
        async with s.post(fleet.url + "/api/create", json=body) as r:
            first = json.loads(await r.content.readline())
            assert first["status"] == "quantizing F16 model to Q4_K_M"
            fleet.gateway.begin_stop(0.0)  # its grace is over at once
            rest = [json.loads(line) async for line in r.content if line.strip()]
        assert rest[-1] == {"error": "server shutting down"}
