"""Traces as a collector gets them: real `corral gateway` and `corral agent` processes with
``--otlp-endpoint`` export over OTLP/HTTP (the SDK's own exporter) to a receiver in the test.

One request is one trace: the gateway's SERVER span → PRODUCER publish → the agent's CONSUMER span
→ its CLIENT call to Ollama, with the model, the serving agent, the token counts and the time to
the first bytes on the gateway's span; a failover is still one trace, its failed attempt an error.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ollama
import openai
import pytest
from corral.runtime.natsserver import NatsServer
from corral.simulator import SimServer, load_config

from tests.integration.agents_kv import AgentsWatch
from tests.integration.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "llama3.2"
_LISTENING = re.compile(r"gateway listening on (\S+)")


@dataclass
class Fleet:
    url: str
    receiver: OtlpReceiver
    sims: dict[str, SimServer]  # agent id -> its Ollama
    agents: dict[str, asyncio.subprocess.Process]
    gateway_log: list[str] = field(default_factory=list)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "OTEL_"))}
    # the SDK's batch processor exports every 50 ms instead of every 5 s: spans arrive while we wait
    env.update(
        {"OTEL_BSP_SCHEDULE_DELAY": "50", "CORRAL_HEARTBEAT_S": "0.5", "CORRAL_PING_INTERVAL_S": "0.2"}
    )
    return env


async def _process(service: str, *args: str, stderr: int | Path) -> asyncio.subprocess.Process:
    if isinstance(stderr, Path):
        with stderr.open("wb") as f:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", f"corral.{service}", *args, env=_env(), stderr=f
            )
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"corral.{service}", *args, env=_env(), stderr=stderr
    )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 15)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def _follow(stream: asyncio.StreamReader, lines: list[str], url: asyncio.Future[str]) -> None:
    """Keep the gateway's log (and its pipe drained); its "listening" line resolves ``url``."""
    while line := (await stream.readline()).decode(errors="replace"):
        lines.append(line)
        if not url.done() and (m := _LISTENING.search(line)):
            url.set_result(m.group(1))
    if not url.done():
        url.set_exception(RuntimeError("the gateway exited before listening:\n" + "".join(lines)))


@asynccontextmanager
async def traced_fleet(
    nats_url: str, root: str, logs: Path, *, agents: int = 2, **sim: float
) -> AsyncIterator[Fleet]:
    """Simulated Ollamas in the test; agents and a gateway as real processes exporting to one receiver."""
    async with AsyncExitStack() as stack:
        receiver = await stack.enter_async_context(OtlpReceiver())
        common = ["--nats", nats_url, "--root", root, "--otlp-endpoint", receiver.url]
        sims: dict[str, SimServer] = {}
        procs: dict[str, asyncio.subprocess.Process] = {}
        for i in range(agents):
            s = SimServer(load_config(None, num_parallel=4, **sim), host="127.0.0.1", port=0)
            await s.start()
            stack.push_async_callback(s.stop)
            agent_id = f"node{i}"
            sims[agent_id] = s
            args = ["--id", agent_id, "--ollama", s.url, "--vendor", "nvidia", "--parallel", "4"]
            procs[agent_id] = await _process("agent", *common, *args, stderr=logs / f"{agent_id}.log")
            stack.push_async_callback(_stop, procs[agent_id])
        watch = await stack.enter_async_context(AgentsWatch(nats_url, root))
        # the gateway reads the fleet when it starts: every agent is in it before its first request
        await watch.until("every agent joined", lambda a: set(a) == set(sims), timeout=20)
        gw = await _process("gateway", *common, "--port", "0", "--claim-timeout-s", "1", "--idle-timeout-s", "1",
                            stderr=asyncio.subprocess.PIPE)  # fmt: skip
        assert gw.stderr is not None
        fleet = Fleet("", receiver, sims, procs)
        listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        follower = asyncio.create_task(_follow(gw.stderr, fleet.gateway_log, listening))
        stack.push_async_callback(asyncio.wait_for, follower, 15)  # ends once the gateway has exited
        stack.push_async_callback(_stop, gw)
        fleet.url = await asyncio.wait_for(listening, 20)
        yield fleet


@pytest.fixture
async def fleet(nats_server: NatsServer, root: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with traced_fleet(nats_server.url, root, tmp_path, time_scale=0.01) as f:
        yield f


def _one(spans: list[ReceivedSpan], kind: str, service: str) -> ReceivedSpan:
    found = [s for s in spans if s.kind == kind and s.service == service]
    assert len(found) == 1, [(s.kind, s.service, s.name) for s in spans]
    return found[0]


async def _request_trace(receiver: OtlpReceiver, name: str) -> list[ReceivedSpan]:
    """The whole trace of the one request whose gateway SERVER span is ``name``: waits for that
    span (the gateway ends it last) and the agent's CONSUMER span of the same trace (it ends after
    its CLIENT span), then checks nothing else arrived in another trace."""
    spans = await receiver.wait_for(lambda s: any(x.kind == "SERVER" and x.name == name for x in s))
    servers = [s for s in spans if s.kind == "SERVER"]
    assert len(servers) == 1, [s.name for s in servers]
    trace_id = servers[0].trace_id
    spans = await receiver.wait_for(
        lambda s: any(x.kind == "CONSUMER" and x.trace_id == trace_id and x.status != "ERROR" for x in s)
    )
    assert {s.trace_id for s in spans} == {trace_id}, "one request, one trace"
    return spans


def _chain(spans: list[ReceivedSpan]) -> tuple[ReceivedSpan, ReceivedSpan, ReceivedSpan, ReceivedSpan]:
    """SERVER → PRODUCER → CONSUMER → CLIENT by their parent links: the agent's consumer span is a
    child of the gateway's publish that reached it, and the returned PRODUCER is that publish."""
    server = _one(spans, "SERVER", "corral-gateway")
    consumer = _one(spans, "CONSUMER", "corral-agent")
    client = _one(spans, "CLIENT", "corral-agent")
    producers = {s.span_id: s for s in spans if s.kind == "PRODUCER"}
    assert all(p.service == "corral-gateway" and p.parent_id == server.span_id for p in producers.values())
    assert server.parent_id == ""
    assert consumer.parent_id in producers
    assert client.parent_id == consumer.span_id
    return server, producers[consumer.parent_id], consumer, client


def _assert_answer(
    server: ReceivedSpan, client: ReceivedSpan, agent: str, prompt: int, generated: int
) -> None:
    """What the gateway's span (and the agent's call to Ollama) says of the answer."""
    for span in (server, client):
        assert span.attributes["gen_ai.request.model"] == "llama3.2:latest"
        assert span.attributes["gen_ai.usage.input_tokens"] == prompt
        assert span.attributes["gen_ai.usage.output_tokens"] == generated
        assert span.attributes["corral.ttft_ms"] > 0
    assert server.attributes["corral.agent"] == agent
    assert server.attributes["corral.route"]  # how the gateway routed it (warm, load ...)
    assert server.attributes["http.response.status_code"] == 200
    # the time to the first bytes is part of the request, which the span covers whole
    assert server.attributes["corral.ttft_ms"] <= server.duration_ms
    assert server.status != "ERROR" and client.status != "ERROR"


async def test_generate_is_one_trace_from_gateway_to_ollama(fleet: Fleet) -> None:
    async with ollama.AsyncClient(host=fleet.url) as client:
        r = await client.generate(model=MODEL, prompt="trace me", options={"num_predict": 5})
    assert r.done and r.eval_count and r.prompt_eval_count

    spans = await _request_trace(fleet.receiver, "POST /api/generate")
    server, publish, consumer, call = _chain(spans)
    assert call.name == "POST /api/generate"
    assert call.attributes["http.response.status_code"] == 200
    assert consumer.attributes["messaging.system"] == "nats"
    served_by = publish.attributes["corral.agent"]
    assert served_by in fleet.agents
    assert server.attributes["gen_ai.operation.name"] == "text_completion"
    _assert_answer(server, call, served_by, r.prompt_eval_count, r.eval_count)
    assert fleet.sims[served_by].stats.finished == 1  # the agent it names is the one that answered


async def test_streamed_openai_chat_is_one_trace_with_its_usage(fleet: Fleet) -> None:
    async with openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="x") as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "trace a stream"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens and usage.prompt_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    spans = await _request_trace(fleet.receiver, "POST /v1/chat/completions")
    server, publish, _, call = _chain(spans)
    assert call.name == "POST /v1/chat/completions"
    assert server.attributes["gen_ai.operation.name"] == "chat"
    _assert_answer(
        server, call, publish.attributes["corral.agent"], usage.prompt_tokens, usage.completion_tokens
    )


async def test_failover_is_one_trace_with_the_failed_attempt_an_error(
    nats_server: NatsServer, root: str, tmp_path: Path
) -> None:
    # loads take ~1.5 s (a window to kill the loading agent in), decoding is fast
    async with (
        traced_fleet(
            nats_server.url, root, tmp_path, time_scale=1.0, load_overhead_s=1.5, decode_rate=4000.0
        ) as fleet,
        ollama.AsyncClient(host=fleet.url) as client,
    ):
        request = asyncio.create_task(
            client.generate(model=MODEL, prompt="hello", options={"num_predict": 5})
        )
        # the model is cold: one agent claims it and its Ollama starts loading; that agent dies
        loading = [
            asyncio.ensure_future(s.stats.wait_for(lambda st: st.loads > 0, timeout=10))
            for s in fleet.sims.values()
        ]
        await asyncio.wait(loading, return_when=asyncio.FIRST_COMPLETED)
        for w in loading:
            w.cancel()
        victim = next(a for a, s in fleet.sims.items() if s.stats.loads > 0)
        fleet.agents[victim].kill()
        r = await asyncio.wait_for(request, 30)
        assert r.done and r.eval_count  # the client never noticed

        spans = await _request_trace(fleet.receiver, "POST /api/generate")
    server, publish, _, call = _chain(spans)
    survivor = next(a for a in fleet.agents if a != victim)
    assert publish.attributes["corral.agent"] == survivor and publish.status != "ERROR"
    # the killed agent's attempt: a publish of the same trace, claimed by it, ended in an error
    failed = [s for s in spans if s.kind == "PRODUCER" and s.status == "ERROR"]
    assert [s.attributes.get("corral.agent") for s in failed] == [victim]
    assert failed[0].attributes["corral.outcome"] == "failed"
    assert failed[0].parent_id == server.span_id
    _assert_answer(server, call, survivor, r.prompt_eval_count or 0, r.eval_count)


async def test_a_request_that_waited_in_the_fleet_queue_is_one_trace(
    nats_server: NatsServer, root: str, tmp_path: Path
) -> None:
    """Six requests on one agent's four slots: those that wait in the fleet queue carry the
    gateway's trace in the queued message, so the agent that takes one carries on its trace."""
    async with (
        traced_fleet(nats_server.url, root, tmp_path, agents=1, time_scale=1.0, decode_rate=20.0) as fleet,
        ollama.AsyncClient(host=fleet.url) as client,
    ):
        await client.generate(model=MODEL, prompt="", keep_alive=-1)  # loaded: the rest is slots
        await fleet.receiver.wait_for(lambda s: {"SERVER", "CONSUMER"} <= {x.kind for x in s})
        fleet.receiver.spans.clear()  # the load's, all in
        asks = [
            client.generate(model=MODEL, prompt=f"wait {i}", options={"num_predict": 10}) for i in range(6)
        ]
        assert all(r.done for r in await asyncio.gather(*asks))
        spans = await fleet.receiver.wait_for(
            lambda s: sum(x.kind == "SERVER" for x in s) == 6 and sum(x.kind == "CONSUMER" for x in s) >= 6
        )
    queued = [s for s in spans if s.kind == "SERVER" and s.attributes["corral.route"] == "queued"]
    assert queued, [s.attributes.get("corral.route") for s in spans if s.kind == "SERVER"]
    for server in queued:
        _, publish, consumer, _ = _chain([s for s in spans if s.trace_id == server.trace_id])
        assert publish.name == f"{root}.queue.{{vendor}}.{{model}} publish"
        assert consumer.status != "ERROR"


async def test_answers_that_failed_say_so_on_the_gateways_span(
    nats_server: NatsServer, root: str, tmp_path: Path
) -> None:
    """A model no agent has: a 404, the client's error (not failed, routed nowhere). A stream whose
    agent dies in its middle: it began 200, then ended with an error line, so its span is failed
    with the status the request ended as."""
    async with (
        traced_fleet(nats_server.url, root, tmp_path, time_scale=1.0, decode_rate=20.0) as fleet,
        ollama.AsyncClient(host=fleet.url) as client,
    ):
        with pytest.raises(ollama.ResponseError) as missing:
            await client.generate(model="no-such-model", prompt="hi")
        assert missing.value.status_code == 404
        spans = await fleet.receiver.wait_for(lambda s: any(x.kind == "SERVER" for x in s))
        (not_found,) = [x for x in spans if x.kind == "SERVER"]
        assert not_found.attributes["http.response.status_code"] == 404
        assert not_found.status != "ERROR" and "corral.route" not in not_found.attributes
        fleet.receiver.spans.clear()

        stream = await client.generate(
            model=MODEL, prompt="a long one", stream=True, options={"num_predict": 400}
        )
        with pytest.raises(ollama.ResponseError):
            async for part in stream:  # the first part: its agent is killed, the rest never comes
                assert not part.done
                if all(p.returncode is None for p in fleet.agents.values()):
                    victim = next(
                        a for a, sim in fleet.sims.items() if sim.stats.started > sim.stats.finished
                    )
                    fleet.agents[victim].kill()
        spans = await fleet.receiver.wait_for(lambda s: any(x.kind == "SERVER" for x in s))
    (cut,) = [x for x in spans if x.kind == "SERVER"]
    assert cut.attributes["http.response.status_code"] == 200  # what went out before the error line
    assert cut.status == "ERROR" and cut.attributes["error.type"] == "502", cut.attributes
