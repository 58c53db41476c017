"""API keys on a real fleet (``CORRAL_AUTH=keys``): keys made by ``corral keys create`` work from the
``ollama`` and ``openai`` clients and ``curl``; a missing or unknown key is 401, a user key 403 on
management and 404 on a model outside its allow-list; limits answer 429 with ``Retry-After``; a
revoked key is refused by two gateways within a second; a user sees no backend addresses; usage is
kept and shown by ``corral keys usage``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import msgspec
import ollama
import openai
import pytest
from corral.gateway.access import Window
from corral.gateway.app import Gateway
from corral.gateway.keys import create_key, open_key_buckets
from corral.gateway.settings import GatewaySettings
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import NatsServer
from corral.runtime.process import AsgiServer
from corral.up import FleetOptions, LocalFleet, default_sims
from nats.js.kv import KeyValue

from tests.integration import cli_helpers as cli
from tests.integration.fleet_helpers import preload, seen

pytestmark = pytest.mark.integration

ROOT = "keys"
MODEL = "llama3.2"


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=ROOT,
        sims=default_sims(2, time_scale=0.01),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={"auth": "keys", "queue_timeout_s": 5.0},
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


async def corral(fleet: LocalFleet, *args: str) -> tuple[int, str, str]:
    return await cli.corral("keys", *args, "--nats", fleet.nats_url, "--root", ROOT)


_n = 0


async def make_key(fleet: LocalFleet, **kw: object) -> tuple[str, str]:
    """A fresh key (name, key), straight through the store, and seen by the gateway."""
    global _n
    _n += 1
    name = f"k{_n}-{time.monotonic_ns()}"
    buckets = await open_key_buckets(fleet.gateway.nc.jetstream(), Subjects(ROOT))  # type: ignore[union-attr]
    key = await create_key(buckets.keys, name, **kw)  # type: ignore[arg-type]
    await seen(fleet.gateway, key)  # type: ignore[arg-type]
    return name, key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(
    url: str, method: str, path: str, key: str | None, body: object = None
) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        r = await s.request(method, url + path, json=body, headers=auth(key) if key else {})
        await r.read()
        return r


async def test_a_created_key_works_from_ollama_openai_and_curl(fleet: LocalFleet) -> None:
    rc, out, err = await corral(fleet, "create", "alice", "--role", "admin")
    assert rc == 0, err
    key = out.strip()
    assert out == key + "\n" and key.startswith("corral-")  # the key alone on stdout
    assert fleet.gateway is not None
    await seen(fleet.gateway, key)
    async with ollama.AsyncClient(host=fleet.url, headers=auth(key)) as c:
        r = await c.generate(model=MODEL, prompt="hi", options={"num_predict": 3})
        assert r.done and r.response
        assert [m.model for m in (await c.list()).models]
    client = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key=key)
    chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content
    await client.close()
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {key}", fleet.url + "/api/tags",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out_b, _ = await asyncio.wait_for(proc.communicate(), 30)
    body, _, code = out_b.decode().rpartition("\n")
    assert code == "200" and json.loads(body)["models"]
    rc, listed, _ = await corral(fleet, "list", "--json")
    assert rc == 0 and "alice" in {k["name"] for k in json.loads(listed)}
    assert key not in listed and "hash" not in listed


async def test_create_and_revoke_with_json_say_what_they_did(fleet: LocalFleet) -> None:
    rc, out, err = await corral(fleet, "create", "jason", "--rpm", "7", "--models", "llama*", "--json")
    assert rc == 0, err
    made = json.loads(out)
    assert made["key"].startswith("corral-") and made["name"] == "jason" and "hash" not in made
    assert (made["role"], made["rpm"], made["models"]) == ("user", 7, ["llama*"])
    rc, out, err = await corral(fleet, "revoke", "jason", "--json")
    assert rc == 0 and json.loads(out) == {"name": "jason", "revoked": True}, err
    # an empty allow-list (a script's unset variable) would allow every model: a usage error
    for bad in (["--models", ""], ["--models", " , "], ["--rpm", "abc"]):
        rc, out, err = await corral(fleet, "create", "blank", *bad)
        assert rc == 2 and not out and "Traceback" not in err, err
    assert "needs at least one model pattern" in (await corral(fleet, "create", "b", "--models", ""))[2]


async def test_a_missing_or_unknown_key_is_401(fleet: LocalFleet) -> None:
    for headers in ({}, auth("corral-not-a-key")):
        async with ollama.AsyncClient(host=fleet.url, headers=headers) as c:
            with pytest.raises(ollama.ResponseError) as e:
                await c.generate(model=MODEL, prompt="hi")
        assert e.value.status_code == 401 and "API key" in e.value.error
    client = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="corral-wrong")
    with pytest.raises(openai.AuthenticationError):
        await client.models.list()
    await client.close()
    async with anthropic.AsyncAnthropic(base_url=fleet.url, api_key="corral-wrong", max_retries=0) as a:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await a.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert (
        isinstance(refused.value.body, dict) and refused.value.body["error"]["type"] == "authentication_error"
    )


async def test_the_anthropic_sdks_x_api_key_is_a_key(fleet: LocalFleet) -> None:
    _, key = await make_key(fleet)
    async with anthropic.AsyncAnthropic(base_url=fleet.url, api_key=key, max_retries=0) as a:
        m = await a.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert m.type == "message" and m.usage.output_tokens > 0
    r = await call(fleet.url, "GET", "/api/tags", None)
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert "error" in json.loads(await r.read())
    assert (await call(fleet.url, "GET", "/", None)).status == 200  # liveness stays open


async def test_a_user_key_is_refused_management(fleet: LocalFleet) -> None:
    _, key = await make_key(fleet)
    digest = "sha256:" + "0" * 64
    for method, path, body in [
        ("POST", "/api/pull", {"model": "llama3.2:1b"}),
        ("POST", "/api/push", {"model": MODEL}),
        ("POST", "/api/create", {"model": "x", "from": MODEL}),
        ("POST", "/api/copy", {"source": MODEL, "destination": "y"}),
        ("DELETE", "/api/delete", {"model": MODEL}),
        ("POST", f"/api/blobs/{digest}", None),
        ("HEAD", f"/api/blobs/{digest}", None),
    ]:
        r = await call(fleet.url, method, path, key, body)
        assert r.status == 403, (method, path, r.status)
        if method != "HEAD":
            assert "forbidden" in json.loads(await r.read())["error"]
    async with ollama.AsyncClient(host=fleet.url, headers=auth(key)) as c:
        assert (await c.generate(model=MODEL, prompt="hi", options={"num_predict": 2})).done
        assert (await c.show(MODEL)).modelfile is not None
        # keep_alive 0 (or under a second) would end others' warm runners: with nothing to run,
        # with a prompt, and through the embedding endpoints alike
        for unload in (
            c.generate(model=MODEL, keep_alive=0),
            c.generate(model=MODEL, prompt="hi", keep_alive="0s", options={"num_predict": 1}),
            c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], keep_alive=0),
            c.embed(model=MODEL, input=[], keep_alive=0),
            c.embeddings(model=MODEL, prompt="", keep_alive=0),
            c.generate(model=MODEL, prompt="hi", keep_alive=0.5, options={"num_predict": 1}),
            c.generate(model=MODEL, prompt="hi", keep_alive="1ns", options={"num_predict": 1}),
        ):
            with pytest.raises(ollama.ResponseError) as refused:
                await unload
            assert refused.value.status_code == 403 and "admin" in refused.value.error
    assert fleet.gateway is not None
    assert fleet.gateway.fleet.with_model("llama3.2:latest")  # nothing was deleted
    assert fleet.gateway.fleet.loaded_on("llama3.2:latest")  # nor unloaded


async def test_a_model_outside_the_allow_list_is_absent(fleet: LocalFleet) -> None:
    _, key = await make_key(fleet, models=("llama3*",))
    _, admin = await make_key(fleet, role="admin")
    async with ollama.AsyncClient(host=fleet.url, headers=auth(key)) as c:
        with pytest.raises(ollama.ResponseError) as hidden:
            await c.embed(model="all-minilm", input="a")
        with pytest.raises(ollama.ResponseError) as hidden_show:
            await c.show("all-minilm")
        assert (await c.generate(model=MODEL, prompt="hi", options={"num_predict": 2})).done
        names = {m.model for m in (await c.list()).models}
    async with ollama.AsyncClient(host=fleet.url, headers=auth(admin)) as c:
        with pytest.raises(ollama.ResponseError) as absent:
            await c.embed(model="no-such-model", input="a")
        assert "all-minilm:latest" in {m.model for m in (await c.list()).models}
    assert hidden.value.status_code == absent.value.status_code == hidden_show.value.status_code == 404
    assert hidden.value.error == absent.value.error.replace("no-such-model", "all-minilm")
    assert names and all(n.startswith("llama3") for n in names)
    client = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key=key)
    assert {m.id for m in (await client.models.list()).data} == names
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("all-minilm:latest")
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="all-minilm", input="a")
    await client.close()


async def test_a_fallback_outside_a_keys_allow_list_does_not_serve_it(fleet: LocalFleet) -> None:
    """A fleet rule serves a missing model by another: not for a key that may not use that other
    (it would reach any model through such a rule); an admin key is served by it."""
    rc, _, err = await cli.corral(
        "fallback", "llama3-gone", "--to", "qwen3:8b", "--nats", fleet.nats_url, "--root", ROOT
    )
    assert rc == 0, err
    gw = fleet.gateway
    assert gw is not None and gw.policy is not None
    await gw.policy.wait_for(lambda p: "llama3-gone:latest" in p.fallbacks, 5.0)
    _, limited = await make_key(fleet, models=("llama3*",))
    _, admin = await make_key(fleet, role="admin")
    body = {"model": "llama3-gone", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
    r = await call(fleet.url, "POST", "/api/generate", admin, body)
    assert r.status == 200 and r.headers["X-Corral-Model"] == "qwen3:8b"
    r = await call(fleet.url, "POST", "/api/generate", limited, body)
    assert r.status == 404 and json.loads(await r.read())["error"] == "model 'llama3-gone' not found"
    # an alias is what its name means: the key may use one its list admits, and sees it listed
    rc, _, err = await cli.corral("alias", "llama3-q", "qwen3:8b", "--nats", fleet.nats_url, "--root", ROOT)
    assert rc == 0, err
    await gw.policy.wait_for(lambda p: "llama3-q:latest" in p.aliases, 5.0)
    r = await call(fleet.url, "POST", "/api/generate", limited, {**body, "model": "llama3-q"})
    assert r.status == 200 and r.headers["X-Corral-Model"] == "qwen3:8b"
    client = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key=limited)
    listed = {m.id for m in (await client.models.list()).data}
    assert "llama3-q:latest" in listed and "qwen3:8b" not in listed
    assert (await client.models.retrieve("llama3-q")).owned_by == "corral"
    await client.close()


async def test_a_user_sees_no_backend_addresses(fleet: LocalFleet) -> None:
    _, user = await make_key(fleet)
    _, admin = await make_key(fleet, role="admin")
    sim_urls = [s.url for s in fleet.sims]
    for path in ("/api/status", "/api/ps"):
        as_user = (await (await call(fleet.url, "GET", path, user)).read()).decode()
        as_admin = (await (await call(fleet.url, "GET", path, admin)).read()).decode()
        assert '"host"' in as_admin and '"host"' not in as_user, path
        assert not any(u in as_user for u in sim_urls), path
        assert "llama3.2" in as_user, path
    status = json.loads((await (await call(fleet.url, "GET", "/api/status", admin)).read()).decode())
    assert {a["ollama_url"] for a in status["agents"]} == set(sim_urls)


async def test_requests_per_minute_answer_429_with_retry_after(fleet: LocalFleet) -> None:
    """The views a console or Open WebUI polls spend nothing of it, before or after it is spent."""
    _, key = await make_key(fleet, rpm=2)
    views = ["/api/tags", "/api/ps", "/api/status", "/api/version", "/v1/models", f"/v1/models/{MODEL}"]

    async def polled() -> list[int]:
        return [(await call(fleet.url, "GET", path, key)).status for path in views]

    assert await polled() == [200] * len(views)
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
    assert [(await call(fleet.url, "POST", "/api/generate", key, body)).status for _ in range(2)] == [
        200,
        200,
    ]
    r = await call(fleet.url, "POST", "/api/generate", key, body)
    assert r.status == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    assert "2 requests per minute" in json.loads(await r.read())["error"]
    assert await polled() == [200] * len(views)
    client = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    await client.close()


async def window(kv: KeyValue, name: str, predicate: object, timeout: float = 5.0) -> Window:
    """Wait until the key's current window satisfies ``predicate`` (a KV watch, no polling)."""
    watcher = await kv.watch(f"{name}.>")
    try:
        async with asyncio.timeout(timeout):
            async for entry in watcher:
                if entry is not None and entry.value:
                    w = msgspec.json.decode(entry.value, type=Window)
                    if predicate(w):  # type: ignore[operator]
                        return w
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    raise AssertionError("unreachable")


async def test_tokens_per_minute_answer_429(fleet: LocalFleet) -> None:
    name, key = await make_key(fleet, tpm=5)
    async with ollama.AsyncClient(host=fleet.url, headers=auth(key)) as c:
        r = await c.generate(model=MODEL, prompt="tell me a story", options={"num_predict": 8})
        spent = (r.eval_count or 0) + (r.prompt_eval_count or 0)
        assert spent >= 5
        buckets = await open_key_buckets(fleet.gateway.nc.jetstream(), Subjects(ROOT))  # type: ignore[union-attr]
        w = await window(buckets.limits, name, lambda w: w.tokens > 0)
        assert w.tokens == spent and w.requests == 1
        with pytest.raises(ollama.ResponseError) as e:
            await c.generate(model=MODEL, prompt="more")
    assert e.value.status_code == 429 and "tokens per minute" in e.value.error


async def test_concurrency_answers_429(fleet: LocalFleet) -> None:
    _, key = await make_key(fleet, concurrency=1)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"model": "llama3.2", '
        await release.wait()
        yield b'"prompt": "hi", "stream": false, "options": {"num_predict": 1}}'

    async with aiohttp.ClientSession() as s:
        first = asyncio.create_task(s.post(fleet.url + "/api/generate", data=slow_body(), headers=auth(key)))
        assert fleet.gateway is not None
        await fleet.gateway.edge.wait_active(1, 5)
        r = await call(fleet.url, "POST", "/api/generate", key, {"model": MODEL, "prompt": "x"})
        assert r.status == 429 and r.headers["Retry-After"] == "1"
        assert "1 concurrent requests" in json.loads(await r.read())["error"]
        release.set()
        held = await first
        assert held.status == 200
        held.release()
    r = await call(fleet.url, "POST", "/api/generate", key, {"model": MODEL, "prompt": "x", "stream": False})
    assert r.status == 200  # the slot is free again


async def test_concurrency_holds_while_the_per_minute_count_is_being_written(fleet: LocalFleet) -> None:
    """With rpm set, admitting a request awaits a KV write; requests arriving meanwhile must still
    see it counted: of six at once, exactly two run."""
    _, key = await make_key(fleet, concurrency=2, rpm=1000)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"model": "llama3.2", '
        await release.wait()
        yield b'"prompt": "hi", "stream": false, "options": {"num_predict": 1}}'

    async with aiohttp.ClientSession() as s:

        async def one() -> int:
            async with s.post(fleet.url + "/api/generate", data=slow_body(), headers=auth(key)) as r:
                await r.read()
                return r.status

        tasks = [asyncio.create_task(one()) for _ in range(6)]
        assert fleet.gateway is not None
        await fleet.gateway.edge.wait_active(2, 5)
        done, _ = await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert done  # the refused ones answer at once, the admitted ones wait for their bodies
        release.set()
        statuses = sorted(await asyncio.gather(*tasks))
    assert statuses == [200, 200, 429, 429, 429, 429]


async def test_a_revoked_key_is_refused_by_two_gateways_within_a_second(fleet: LocalFleet) -> None:
    assert fleet.gateway is not None
    second = Gateway(GatewaySettings(nats_url=fleet.nats_url, root=ROOT, port=0, auth="keys"))
    http = AsgiServer(second, "127.0.0.1", 0)
    await http.start()
    try:
        name, key = await make_key(fleet)
        await seen(second, key)
        for url in (fleet.url, http.url):
            assert (await call(url, "GET", "/api/tags", key)).status == 200
        rc, _, err = await corral(fleet, "revoke", name)
        assert rc == 0, err
        revoked = time.monotonic()
        await asyncio.gather(seen(fleet.gateway, key, present=False), seen(second, key, present=False))
        assert time.monotonic() - revoked < 1.0
        for url in (fleet.url, http.url):
            assert (await call(url, "GET", "/api/tags", key)).status == 401
        rc, _, err = await corral(fleet, "revoke", name)
        assert rc == 1 and "no key" in err
    finally:
        await http.stop()


async def test_usage_is_kept_per_key_and_model(fleet: LocalFleet) -> None:
    name, key = await make_key(fleet)
    async with ollama.AsyncClient(host=fleet.url, headers=auth(key)) as c:
        replies = [await c.generate(model=MODEL, prompt="hi", options={"num_predict": 3}) for _ in range(3)]
        for i in range(3):  # names no agent has: counted together, not a row each
            with pytest.raises(ollama.ResponseError):
                await c.generate(model=f"no-such-model-{i}", prompt="hi")
    assert fleet.gateway is not None and fleet.gateway.access is not None
    await fleet.gateway.access.usage.flush()
    rc, out, err = await corral(fleet, "usage", name, "--json")
    assert rc == 0, err
    rows = json.loads(out)
    hourly = [r for r in rows if r["model"] == "llama3.2:latest" and "T" in r["period"]]
    daily = [r for r in rows if r["model"] == "llama3.2:latest" and "T" not in r["period"]]
    assert len(hourly) == len(daily) == 1
    for r in (hourly[0], daily[0]):
        assert r["key"] == name and r["requests"] == 3 and r["errors"] == 0
        assert r["eval_tokens"] == sum(x.eval_count or 0 for x in replies) > 0
        assert r["prompt_tokens"] == sum(x.prompt_eval_count or 0 for x in replies)
    missing = [r for r in rows if r["model"] == "other" and "T" in r["period"]]
    assert missing and missing[0]["errors"] == 3
    assert not [r for r in rows if r["model"].startswith("no-such-model")]
    rc, table, _ = await corral(fleet, "usage")
    assert rc == 0 and name in table and "EVAL" in table
    # a key that is not there is an error, not an empty table; a fresh one's is an empty table
    rc, _, err = await corral(fleet, "usage", "nobody")
    assert rc == 1 and "no key named 'nobody'" in err
    fresh, _ = await make_key(fleet)
    rc, out, err = await corral(fleet, "usage", fresh, "--json")
    assert rc == 0 and json.loads(out) == [], err


async def test_pulls_only_from_allowed_registries(fleet: LocalFleet) -> None:
    _, admin = await make_key(fleet, role="admin")
    for model, insecure in [("evil.example:5000/library/x", True), ("http://10.0.0.1/a/b", False)]:
        r = await call(fleet.url, "POST", "/api/pull", admin, {"model": model, "insecure": insecure})
        assert r.status == 400
        assert "not allowed" in json.loads(await r.read())["error"]
