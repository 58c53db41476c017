"""ollama-sim over a real socket, driven by the official `ollama` and `openai` clients and raw HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import ollama
import openai
import pytest
from corral.simulator import GpuConfig, ModelConfig, SimConfig, SimServer, load_config

pytestmark = pytest.mark.integration

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(load_config(time_scale=0.0005, vram_release_s=0.1), port=0) as server:
        yield server


@pytest.fixture
async def client(sim: SimServer) -> AsyncIterator[ollama.AsyncClient]:
    c = ollama.AsyncClient(host=sim.url)
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


# ---- native API through the ollama client -------------------------------------------------------


async def test_generate_non_stream(client: ollama.AsyncClient) -> None:
    r = await client.generate(model="llama3.2", prompt="Why is the sky blue?")
    assert r.model == "llama3.2"  # echoed verbatim
    assert r.done and r.done_reason == "stop" and r.response
    assert r.eval_count and r.eval_count >= 20
    assert r.prompt_eval_count and r.context and len(r.context) > r.prompt_eval_count
    assert r.total_duration and r.load_duration and r.eval_duration and r.prompt_eval_duration
    assert r.total_duration >= r.load_duration + r.eval_duration


async def test_generate_stream_is_deterministic(client: ollama.AsyncClient) -> None:
    async def run() -> tuple[str, ollama.GenerateResponse]:
        parts = []
        last = None
        async for chunk in await client.generate(
            model="llama3.2", prompt="hello", stream=True, options={"seed": 42}
        ):
            parts.append(chunk.response)
            last = chunk
        assert last is not None
        return "".join(parts), last

    text1, final1 = await run()
    text2, _ = await run()
    assert text1 == text2 and len(text1) > 20
    assert final1.done and final1.eval_count and final1.context
    r = await client.generate(model="llama3.2", prompt="hello", options={"seed": 42})
    assert r.response == text1


async def test_num_predict_gives_length(client: ollama.AsyncClient) -> None:
    r = await client.generate(model="llama3.2", prompt="count", options={"num_predict": 3})
    assert r.done_reason == "length" and r.eval_count == 3


async def test_case_insensitive_model_names(client: ollama.AsyncClient) -> None:
    for name in ("Llama3.2:latest", "registry.ollama.ai/library/llama3.2:latest", "library/LLAMA3.2"):
        r = await client.generate(model=name, prompt="hi", options={"num_predict": 1})
        assert r.model == name


async def test_chat_stream_and_multi_turn_cache(client: ollama.AsyncClient, sim: SimServer) -> None:
    messages = [{"role": "user", "content": "tell me about foxes"}]
    content = []
    last = None
    async for chunk in await client.chat(model="llama3.2", messages=messages, stream=True):
        assert chunk.message.role == "assistant"
        content.append(chunk.message.content or "")
        last = chunk
    assert last is not None and last.done and last.done_reason == "stop" and last.eval_count
    reply = "".join(content)
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    cached_before = sim.stats.prompt_tokens_cached
    r = await client.chat(model="llama3.2", messages=messages)
    assert r.message.content and r.prompt_eval_count
    assert sim.stats.prompt_tokens_cached - cached_before >= r.prompt_eval_count - 5


async def test_chat_tool_call(client: ollama.AsyncClient) -> None:
    r = await client.chat(
        model="llama3.2",
        messages=[{"role": "user", "content": "use get_weather for Tokyo"}],
        tools=TOOLS,
    )
    assert r.message.tool_calls
    call = r.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    assert "city" in call.function.arguments
    chunks = [
        c
        async for c in await client.chat(
            model="llama3.2",
            messages=[{"role": "user", "content": "use get_weather please"}],
            tools=TOOLS,
            stream=True,
        )
    ]
    assert any(c.message.tool_calls for c in chunks) and chunks[-1].done


async def test_thinking_model_thinks(client: ollama.AsyncClient) -> None:
    r = await client.chat(model="qwen3:8b", messages=[{"role": "user", "content": "hi"}])
    assert r.message.thinking and r.message.content
    r = await client.chat(model="qwen3:8b", messages=[{"role": "user", "content": "hi"}], think=False)
    assert not r.message.thinking
    with pytest.raises(ollama.ResponseError) as e:
        await client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], think=True)
    assert e.value.status_code == 400 and e.value.error == '"llama3.2" does not support thinking'


async def test_capability_errors(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        await client.generate(model="all-minilm", prompt="hi")
    assert (e.value.status_code, e.value.error) == (400, '"all-minilm" does not support generate')
    with pytest.raises(ollama.ResponseError) as e:
        await client.chat(model="all-minilm", messages=[{"role": "user", "content": "x"}])
    assert e.value.error == '"all-minilm" does not support chat'


async def test_embed_and_embeddings(client: ollama.AsyncClient) -> None:
    r = await client.embed(model="all-minilm", input=["hello", "world"])
    assert r.model == "all-minilm" and len(r.embeddings) == 2 and len(r.embeddings[0]) == 384
    assert sum(x * x for x in r.embeddings[0]) == pytest.approx(1.0)
    again = await client.embed(model="all-minilm", input="hello")
    assert again.embeddings[0] == r.embeddings[0]
    legacy = await client.embeddings(model="all-minilm", prompt="hello")
    assert len(legacy.embedding) == 384
    with pytest.raises(ollama.ResponseError) as e:
        await client.embed(model="nope", input="x")
    assert (e.value.status_code, e.value.error) == (404, 'model "nope" not found, try pulling it first')


async def test_a_model_embeds_alike_on_every_server(client: ollama.AsyncClient) -> None:
    """A model's vectors come from its weights: another server (another seed) gives the same ones,
    as real Ollamas do, so a fleet's vectors can be compared; another model gives others."""
    r = await client.embed(model="all-minilm", input="hello")
    async with SimServer(load_config(time_scale=0.0005, seed=7), port=0) as other:
        c = ollama.AsyncClient(host=other.url)
        assert (await c.embed(model="all-minilm", input="hello")).embeddings == r.embeddings
        await c.close()
    await client.copy("all-minilm", "minilm-copy")  # the same weights: the same vectors
    assert (await client.embed(model="minilm-copy", input="hello")).embeddings == r.embeddings
    other = await client.embed(model="qwen3:8b", input="hello", dimensions=384)  # other weights
    assert other.embeddings != r.embeddings


async def test_list_show_ps(client: ollama.AsyncClient) -> None:
    tags = await client.list()
    names = [m.model for m in tags.models]
    assert "llama3.2:latest" in names and "llama3.2:1b" not in names
    assert all(m.digest and len(m.digest) == 64 for m in tags.models)
    show = await client.show("llama3.2")
    assert show.modelinfo and show.modelinfo["general.architecture"] == "llama"
    assert show.capabilities == ["completion", "tools"]
    assert show.details and show.details.parameter_size == "3.2B"
    with pytest.raises(ollama.ResponseError) as e:
        await client.show("missing")
    assert (e.value.status_code, e.value.error) == (404, "model 'missing:latest' not found")
    assert (await client.ps()).models == []
    await client.generate(model="llama3.2", prompt="")
    ps = await client.ps()
    assert [m.name for m in ps.models] == ["llama3.2:latest"]
    m = ps.models[0]
    assert m.size_vram == m.size and m.context_length == 32768
    assert m.expires_at is not None and m.expires_at > datetime.now(UTC)


async def test_load_and_unload(client: ollama.AsyncClient, sim: SimServer) -> None:
    r = await client.generate(model="llama3.2", prompt="")
    assert r.done_reason == "load" and r.eval_count is None and sim.stats.loads == 1
    r = await client.chat(model="llama3.2", messages=[])
    assert r.done_reason == "load" and sim.stats.loads == 1
    r = await client.generate(model="llama3.2", prompt="", keep_alive=0)
    assert r.done_reason == "unload"
    assert (await client.ps()).models == [] and sim.stats.unloads == 1
    r = await client.chat(model="llama3.2", messages=[], keep_alive="0s")
    assert r.done_reason == "unload"


async def test_keep_alive_expiry_with_scaled_time(client: ollama.AsyncClient, sim: SimServer) -> None:
    await client.generate(model="llama3.2", prompt="hi", keep_alive="5s")  # 2.5 ms of wall time
    await sim.stats.wait_for(lambda s: s.expirations == 1, timeout=5)
    assert (await client.ps()).models == []


async def test_pull_with_progress(client: ollama.AsyncClient) -> None:
    progress = [p async for p in await client.pull("llama3.2:1b", stream=True)]
    assert progress[0].status == "pulling manifest"
    assert progress[-1].status == "success"
    layer_lines = [p for p in progress if p.digest]
    assert layer_lines and all(p.status == "pulling " + p.digest[7:19] for p in layer_lines)
    assert any(p.completed == p.total for p in layer_lines)
    assert "llama3.2:1b" in [m.model for m in (await client.list()).models]
    single = await client.pull("mistral")
    assert single.status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        async for _ in await client.pull("no-such-model", stream=True):
            pass
    assert e.value.error == "pull model manifest: file does not exist"
    with pytest.raises(ollama.ResponseError) as e:
        await client.pull("no-such-model")
    assert e.value.status_code == 500


async def test_a_cut_pull_resumes_where_it_left_off(http: aiohttp.ClientSession) -> None:
    """Ollama keeps a cut download's partial blob and the next pull of the model resumes it: its
    first progress line for that layer starts where the cut one got to."""
    config = load_config(time_scale=1.0, pull_bandwidth=400e6)  # 1.3 GB: about 3 s
    async with SimServer(config, port=0) as sim:
        seen = {}
        async with http.post(sim.url + "/api/pull", json={"model": "llama3.2:1b"}) as r:
            async for raw in r.content:
                seen = json.loads(raw)
                if seen.get("completed"):
                    break  # the client goes: the pull is cut
        await sim.stats.wait_for(lambda st: st.pulls_cut == 1, timeout=10)
        async with http.post(sim.url + "/api/pull", json={"model": "llama3.2:1b"}) as r:
            lines = [json.loads(raw) async for raw in r.content]
    resumed = next(line for line in lines if line.get("digest") == seen["digest"])
    assert resumed["completed"] >= seen["completed"] > 0 and resumed["total"] == seen["total"]
    assert lines[-1] == {"status": "success"}


async def test_copy_create_delete_push(client: ollama.AsyncClient) -> None:
    assert (await client.copy("llama3.2", "backup:1")).status == "success"
    assert "backup:1" in [m.model for m in (await client.list()).models]
    statuses = [
        p.status async for p in await client.create("mine", from_="llama3.2", system="Be brief.", stream=True)
    ]
    assert statuses[-1] == "success" and any(s and s.startswith("using existing layer") for s in statuses)
    show = await client.show("mine")
    assert show.details and show.details.parent_model == "llama3.2:latest"
    assert (await client.delete("backup:1")).status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        await client.delete("backup:1")
    assert (e.value.status_code, e.value.error) == (404, "model 'backup:1' not found")
    with pytest.raises(ollama.ResponseError) as e:
        await client.copy("nope", "x")
    assert e.value.error == 'model "nope" not found'
    pushed = [p.status async for p in await client.push("mine", stream=True)]
    assert pushed[0] == "retrieving manifest" and pushed[-1] == "success"


async def test_a_create_from_a_base_not_on_disk_pulls_it_first(client: ollama.AsyncClient) -> None:
    """Ollama pulls a ``from`` it lacks before it creates (the pull's progress and its own
    ``success`` in the create's stream); one the registry lacks fails as that pull does."""
    assert "gemma3:4b" not in [m.model for m in (await client.list()).models]
    parts = [
        p async for p in await client.create("gem-brief", from_="gemma3:4b", system="Brief.", stream=True)
    ]
    statuses = [p.status or "" for p in parts]
    assert statuses[0] == "pulling manifest" and statuses[-2:] == ["writing manifest", "success"], statuses
    pulled = statuses.index("verifying sha256 digest")
    assert statuses[pulled + 2] == "success" and statuses.count("success") == 2, statuses
    layer = [p for p in parts[:pulled] if p.status and p.status.startswith("pulling ") and p.digest]
    assert layer and all(p.total for p in layer)
    held = [m.model for m in (await client.list()).models]
    assert "gemma3:4b" in held and "gem-brief:latest" in held
    shown = await client.show("gem-brief")
    assert shown.details and shown.details.parent_model == "gemma3:4b"
    with pytest.raises(ollama.ResponseError) as e:
        async for _ in await client.create("x", from_="no-such-model", stream=True):
            pass
    assert e.value.error == "pull model manifest: file does not exist"
    with pytest.raises(ollama.ResponseError) as e:
        await client.create("x", from_="no-such-model")
    assert (e.value.status_code, e.value.error) == (500, "pull model manifest: file does not exist")


async def test_blobs_and_create_from_files(sim: SimServer, http: aiohttp.ClientSession) -> None:
    data = b"GGUF fake model bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with http.head(f"{sim.url}/api/blobs/{digest}") as r:
        assert r.status == 404
    async with http.post(f"{sim.url}/api/blobs/{digest}", data=b"other") as r:
        assert r.status == 400 and (await r.json())["error"].startswith("digest mismatch")
    async with http.post(f"{sim.url}/api/blobs/{digest}", data=data) as r:
        assert r.status == 201
    async with http.post(f"{sim.url}/api/blobs/{digest}", data=data) as r:
        assert r.status == 200
    async with http.head(f"{sim.url}/api/blobs/{digest}") as r:
        assert r.status == 200
    c = ollama.AsyncClient(host=sim.url)
    try:
        r2 = await c.create("fromfile", files={"model.gguf": digest})
        assert r2.status == "success"
    finally:
        await c.close()


async def test_sync_client_in_a_thread(sim: SimServer) -> None:
    def work() -> str:
        c = ollama.Client(host=sim.url)
        try:
            return c.generate(model="llama3.2", prompt="hi", options={"num_predict": 2}).done_reason or ""
        finally:
            c.close()

    assert await asyncio.to_thread(work) == "length"


# ---- OpenAI-compatible API through the openai client --------------------------------------------


async def test_openai_chat(oai: openai.AsyncOpenAI) -> None:
    r = await oai.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert r.model == "llama3.2" and r.object == "chat.completion"
    assert r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r = await oai.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "call get_weather"}], tools=TOOLS
    )
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert json.loads(call.function.arguments)["city"]  # type: ignore[union-attr]


async def test_openai_chat_stream_with_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=5,
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens == 5


async def test_openai_completions_embeddings_models(oai: openai.AsyncOpenAI) -> None:
    c = await oai.completions.create(model="llama3.2", prompt="Once upon", max_tokens=4)
    assert c.choices[0].text and c.choices[0].finish_reason == "length"
    e = await oai.embeddings.create(model="all-minilm", input=["a", "b"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 384
    models = await oai.models.list()
    assert "llama3.2:latest" in [m.id for m in models.data]
    m = await oai.models.retrieve("llama3.2")
    assert m.id == "llama3.2" and m.owned_by == "library"


async def test_openai_errors(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        await oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    assert e.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.BadRequestError) as e2:
        await oai.chat.completions.create(model="llama3.2", messages=[])
    assert "[] is too short - 'messages'" in str(e2.value)
    with pytest.raises(openai.BadRequestError) as e2:  # a suffix reaches Ollama's native check
        await oai.completions.create(model="llama3.2", prompt="def f(", suffix="return 1", max_tokens=4)
    message = (
        "registry.ollama.ai/library/llama3.2:latest does not support insert"  # as the native route words it
    )
    assert e2.value.body and e2.value.body["message"] == message  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await oai.models.retrieve("nope")


# ---- raw HTTP: exact bytes ----------------------------------------------------------------------


async def test_framing_and_content_types(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with http.get(sim.url + "/") as r:
        assert r.status == 200 and await r.text() == "Ollama is running"
        assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    async with http.head(sim.url + "/api/version") as r:
        assert r.status == 200
    async with http.get(sim.url + "/api/version") as r:
        assert await r.read() == b'{"version":"0.12.3"}'
    body = {"model": "llama3.2", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    async with http.post(sim.url + "/api/generate", json=body) as r:
        raw = await r.read()
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        assert not raw.endswith(b"\n")
    body["stream"] = True
    async with http.post(sim.url + "/api/generate", json=body) as r:
        assert r.headers["Content-Type"] == "application/x-ndjson"
        lines = (await r.read()).split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4  # 2 tokens, final, trailing newline
    final = json.loads(lines[-2])
    assert list(final) == [
        "model",
        "created_at",
        "response",
        "done",
        "done_reason",
        "context",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ]
    assert list(json.loads(lines[0])) == ["model", "created_at", "response", "done"]
    assert json.loads(lines[0])["created_at"].endswith("Z")
    del body["stream"]  # absent ⇒ stream
    async with http.post(
        sim.url + "/api/chat", json={**body, "messages": [{"role": "user", "content": "x"}]}
    ) as r:
        assert r.headers["Content-Type"] == "application/x-ndjson"
        chunks = [json.loads(line) for line in (await r.read()).splitlines()]
    assert list(chunks[0]["message"]) == ["role", "content"] and chunks[-1]["done"] is True
    assert "context" not in chunks[-1]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "expected"),
    [
        ("GET", "/nope", None, 404, b"404 page not found"),
        ("GET", "/api/generate", None, 405, b"405 method not allowed"),
        ("HEAD", "/api/ps", None, 405, b""),
        ("POST", "/api/generate", b"", 400, b'{"error":"missing request body"}'),
        (
            "POST",
            "/api/generate",
            b"x",
            400,
            b'{"error":"invalid character \'x\' looking for beginning of value"}',
        ),
        ("POST", "/api/generate", b'{"model":""}', 404, b'{"error":"model \'\' not found"}'),
        ("POST", "/api/generate", b'{"model":"a:b:"}', 400, b'{"error":"invalid model name"}'),
        ("POST", "/api/generate", b'{"model":"llama3"}', 404, b'{"error":"model \'llama3\' not found"}'),
        ("POST", "/api/chat", b'{"model":""}', 400, b'{"error":"model is required"}'),
        ("POST", "/api/show", b'{"model":"Llama3"}', 404, b'{"error":"model \'Llama3:latest\' not found"}'),
        (
            "POST",
            "/api/generate",
            b'{"model":"llama3.2","prompt":"x","keep_alive":"300"}',
            400,
            b'{"error":"time: missing unit in duration \\"300\\""}',
        ),
        (
            "POST",
            "/api/generate",
            b'{"model":"llama3.2","prompt":"x","options":{"num_ctx":"4096"}}',
            500,
            b'{"error":"option \\"num_ctx\\" must be of type integer"}',
        ),
        (
            "POST",
            "/api/chat",
            b'{"model":"llama3.2","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}]}',
            200,
            None,
        ),
        (
            "POST",
            "/api/chat",
            b'{"model":"qwen3:8b","messages":[],"tools":[]}',
            200,
            None,
        ),
        ("DELETE", "/api/delete", b'{"name":"gone"}', 404, b'{"error":"model \'gone\' not found"}'),
        ("POST", "/api/embed", b'{"model":"all-minilm","input":5}', 400, b'{"error":"invalid input type"}'),
        ("POST", "/api/embeddings", b'{"model":""}', 400, b'{"error":"model is required"}'),
        (
            "POST",
            "/v1/chat/completions",
            b'{"model":"llama3.2","messages":[{"role":"user","content":"x"}],"temperature":"hot"}',
            400,
            b'{"error":{"message":"json: cannot unmarshal string into Go struct field '
            b'ChatCompletionRequest.temperature of type float64","type":"invalid_request_error",'
            b'"param":null,"code":null}}',
        ),
        (
            "POST",
            "/v1/chat/completions",
            b'{"model":"llama3.2","messages":[{"role":"user","content":"x"}],"stream":"yes"}',
            400,
            None,
        ),
        ("POST", "/v1/completions", b'{"model":"llama3.2","prompt":"x","max_tokens":1.5}', 400, None),
        (
            "POST",
            "/api/embed",
            b'{"model":"all-minilm","input":[]}',
            200,
            b'{"model":"all-minilm","embeddings":[]}',
        ),
    ],
)
async def test_exact_errors(
    sim: SimServer,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    expected: bytes | None,
) -> None:
    async with http.request(method, sim.url + path, data=body) as r:
        assert r.status == status
        raw = await r.read()
        if expected is not None:
            assert raw == expected
        if status == 404 and path == "/nope":
            assert r.headers["Content-Type"] == "text/plain"


async def test_tools_on_a_model_without_the_capability(http: aiohttp.ClientSession) -> None:
    cfg = SimConfig(
        time_scale=0,
        models=[ModelConfig(name="gemma2", size_gb=1.0, capabilities=["completion"])],
    )
    async with SimServer(cfg, port=0) as sim:
        body = {"model": "gemma2", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
        async with http.post(sim.url + "/api/chat", json=body) as r:
            assert r.status == 400
            assert await r.json() == {
                "error": "registry.ollama.ai/library/gemma2:latest does not support tools"
            }


async def test_503_text_and_load_abort_on_disconnect(http: aiohttp.ClientSession) -> None:
    cfg = load_config(
        time_scale=1.0,
        max_queue=1,
        load_overhead_s=60.0,
        models=[
            ModelConfig(name="a", size_gb=1.0),
            ModelConfig(name="b", size_gb=1.0),
            ModelConfig(name="c", size_gb=1.0),
        ],
    )
    async with SimServer(cfg, port=0, shutdown_timeout=0.1) as sim:

        async def gen(model: str) -> tuple[int, bytes]:
            async with http.post(sim.url + "/api/generate", json={"model": model, "prompt": "hi"}) as r:
                return r.status, await r.read()

        first = asyncio.ensure_future(gen("a"))
        await sim.stats.wait_for(lambda s: s.loads == 1)
        second = asyncio.ensure_future(gen("b"))
        await sim.stats.wait_for(lambda s: s.started == 2)
        status, raw = await asyncio.wait_for(gen("c"), 5)
        assert status == 503
        assert raw == b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'
        first.cancel()  # the client that triggered the load goes away: the load is aborted
        await sim.stats.wait_for(lambda s: s.load_aborts == 1 and s.cancelled >= 1)
        second.cancel()
        await sim.stats.wait_for(lambda s: s.cancelled == 2)


async def test_disconnect_mid_stream_is_counted(http: aiohttp.ClientSession) -> None:
    cfg = SimConfig(time_scale=0.05, gpus=[GpuConfig(vram_gb=24)], load_overhead_s=0.0, load_bandwidth=1e12)
    async with SimServer(cfg, port=0) as sim:
        body = {"model": "llama3.2", "prompt": "a long story", "options": {"num_predict": 10_000}}
        async with http.post(sim.url + "/api/generate", json=body) as r:
            first = await r.content.readline()
            assert json.loads(first)["done"] is False
        # leaving the block closes the connection mid-stream
        await sim.stats.wait_for(lambda s: s.cancelled == 1)
        runner = sim.scheduler.runners["llama3.2:latest"]
        assert runner.refcount == 0
        assert not any(slot.busy for slot in runner.slots)
        assert sim.stats.per_model["llama3.2:latest"].cancelled == 1


async def test_stop_is_idempotent_and_safe_before_start() -> None:
    s = SimServer(SimConfig(time_scale=0), port=0)
    await s.stop()
    await s.stop()
    s2 = SimServer(SimConfig(time_scale=0), port=0)
    await s2.start()
    assert s2.port != 0 and s2.url.startswith("http://127.0.0.1:")
    await s2.stop()
    await s2.stop()


async def test_redirects_heads_and_reload_over_http(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with http.get(sim.url + "/api/tags/", allow_redirects=False) as r:
        assert r.status == 301 and r.headers["Location"] == "/api/tags"
    async with http.head(sim.url + "/api/tags") as r:
        assert r.status == 200
    body = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 1}}
    async with http.post(sim.url + "/api/generate", json=body) as r:
        assert r.status == 200
    body["options"] = {"num_predict": 1, "num_ctx": 8192}
    async with http.post(sim.url + "/api/generate", json=body) as r:
        assert r.status == 200
    assert sim.stats.reloads == 1 and sim.stats.loads == 2
    async with http.get(sim.url + "/api/ps") as r:
        models = (await r.json())["models"]
    assert [m["context_length"] for m in models] == [8192]
    assert list(models[0]) == [
        "name",
        "model",
        "size",
        "digest",
        "details",
        "expires_at",
        "size_vram",
        "context_length",
    ]


async def test_a_prompt_longer_than_the_context_is_cut_to_it_as_ollamas_runner_does(
    client: ollama.AsyncClient,
) -> None:
    long = "word " * 20_000
    r = await client.generate(model="llama3.2", prompt=long, options={"num_ctx": 2048})
    assert r.prompt_eval_count == 2048
    c = await client.chat(
        model="llama3.2", messages=[{"role": "user", "content": long}], options={"num_ctx": 2048}
    )
    assert c.prompt_eval_count == 2048
    short = await client.generate(model="llama3.2", prompt="hello there", options={"num_ctx": 2048})
    assert short.prompt_eval_count is not None and 0 < short.prompt_eval_count < 100
