"""An Ollama whose HTTP server answers (its `/api/ps`, `/api/tags`) while its model endpoints fail:
the connection closed before any response, Ollama's own 500 for a runner that died, or a runner
that stops sending. The agent in front of it stays in the fleet, so routing is what keeps its
failures from the clients: each request is tried there at most once and then on the agent that
works; a request only that agent may serve gets its failure at once, as one Ollama would have given
it, not a wait for the queue's deadline; a stream it stops sending ends after `stall_s`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import pytest
from corral.protocol.messages import RequestFinished, request_finished_decoder
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import NatsServer
from corral.simulator import SimServer
from corral.up import Backend, FleetOptions, LocalFleet, default_sims
from nats.aio.msg import Msg

from tests.chaos.faulty_ollama import RUNNER_DIED, FaultyOllama
from tests.integration.fleet_helpers import until

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
KEY = parse_name(MODEL).key
REQUESTS = 12
STALL_S = 1.0  # a streamed request its Ollama sends nothing for this long ends (300 s by default)
STRICT = {"X-Load-Balancing-Strategy": "nvidia", "X-Enforce-Strategy": "true"}  # the failing agent's


@contextlib.asynccontextmanager
async def proxied_fleet(
    nats_server: NatsServer, root: str
) -> AsyncIterator[tuple[LocalFleet, FaultyOllama, FaultyOllama]]:
    """Two agents, nvidia's and amd's, each behind its own proxy (which passes everything through
    while no fault is set), the model warm on both."""
    nv_sim, amd_sim = default_sims(2, time_scale=0.01)
    async with (
        SimServer(nv_sim, port=0) as nv,
        SimServer(amd_sim, port=0) as amd,
        FaultyOllama(nv.url).serving() as nv_proxy,
        FaultyOllama(amd.url).serving() as amd_proxy,
    ):
        options = FleetOptions(
            port=0,
            nats_url=nats_server.url,
            root=root,
            backends=[
                Backend(url=nv_proxy.url, vendor="nvidia", parallel=2),
                Backend(url=amd_proxy.url, vendor="amd", parallel=2),
            ],
            agent={"refresh_s": 0.5, "heartbeat_s": 0.5, "stall_s": STALL_S},
            gateway={"queue_timeout_s": 30.0},  # a request caught waiting would end as a 503, not hang
            aggregator=None,
        )
        async with LocalFleet(options) as f, aiohttp.ClientSession() as s:
            for url in (nv.url, amd.url):  # warm on both, before anything fails
                body = {"model": MODEL, "prompt": "", "keep_alive": -1}
                async with s.post(url + "/api/generate", json=body) as r:
                    assert r.status == 200
            for a in f.agents:
                a._wake.refresh.set()
            assert f.gateway is not None
            view = f.gateway.fleet
            await until(f, lambda: len(view.loaded_on(KEY)) == 2, what="warm on both agents")
            yield f, nv_proxy, amd_proxy


@pytest.fixture
async def fleet(nats_server: NatsServer, root: str) -> AsyncIterator[tuple[LocalFleet, FaultyOllama]]:
    """The failing agent (nvidia's) and one that works (amd's, its proxy faultless)."""
    async with proxied_fleet(nats_server, root) as (f, faulty, _):
        yield f, faulty


@pytest.fixture
async def both_faulty(
    nats_server: NatsServer, root: str
) -> AsyncIterator[tuple[LocalFleet, FaultyOllama, FaultyOllama]]:
    async with proxied_fleet(nats_server, root) as both:
        yield both


async def generate(s: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str, dict[str, Any]]:
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    async with s.post(url + "/api/generate", json=body, headers=headers) as r:
        return r.status, r.headers.get("x-corral-agent", ""), await r.json()


@pytest.mark.parametrize("fault", ["reset", "500"])
async def test_a_failing_ollama_is_tried_once_per_request_and_its_error_given_when_alone(
    fleet: tuple[LocalFleet, FaultyOllama], fault: str
) -> None:
    f, faulty = fleet
    bad_agent = next(a.id for a in f.agents if a.settings.vendor == "nvidia")
    faulty.fault = fault  # type: ignore[assignment]
    async with aiohttp.ClientSession() as s:
        faulty.hits = 0
        for _ in range(REQUESTS):
            status, agent, body = await generate(s, f.url)
            assert status == 200 and body["done"], body
            assert agent != bad_agent
        # a connection that ended with no answer: at most the first, whose failure trips this
        # gateway's breaker for the agent and model (the next requests go to the other agent by
        # name); a 5xx may be the request's own doing, trips nothing, and is tried once elsewhere
        assert faulty.hits <= (1 if fault == "reset" else REQUESTS)
        # only the failing agent may serve it: its failure at once, not the queue's deadline
        faulty.hits = 0
        status, _, body = await generate(s, f.url, **STRICT)
        assert faulty.hits == 1
        if fault == "500":  # Ollama's own answer, as it gave it
            assert status == 500 and body == {"error": RUNNER_DIED.split('"')[3]}
        else:  # the agent could not read an answer from its Ollama
            assert status == 502 and body["error"].startswith("ollama unavailable"), body
        # a connection that ended with no answer took that agent out until it read its Ollama
        # again, at once: its server answers, so it holds its claims again (shared subjects, the
        # fleet queue) before any request of its own ends
        bad = next(a for a in f.agents if a.id == bad_agent)
        await until(f, lambda: bad._claims is not None and any(bad._claims._armed.values()), what="re-armed")
        faulty.fault = None  # mended: it serves again
        status, agent, body = await generate(s, f.url, **STRICT)
        assert status == 200 and agent == bad_agent


async def streamed(s: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, list[dict[str, Any]]]:
    body = {"model": MODEL, "prompt": "hi", "options": {"num_predict": 2}}
    async with s.post(url + "/api/generate", json=body, headers=headers) as r:
        return r.status, [json.loads(line) for line in (await r.text()).splitlines() if line.strip()]


async def test_a_stream_its_ollama_stops_sending_ends_and_one_not_begun_goes_elsewhere(
    fleet: tuple[LocalFleet, FaultyOllama], nats_server: NatsServer, root: str
) -> None:
    f, faulty = fleet
    silent = f"ollama at {faulty.url} sent nothing for {STALL_S:.0f} s"
    failing = next(a.id for a in f.agents if a.vendor == "nvidia")
    finished: asyncio.Queue[RequestFinished] = asyncio.Queue()  # what the fleet's rates are made of
    nc = await nats.connect(nats_server.url)

    async def heard(msg: Msg) -> None:
        if (event := request_finished_decoder.decode(msg.data)).agent == failing:
            finished.put_nowait(event)

    await nc.subscribe(Subjects(root).event("request"), cb=heard)
    faulty.fault = "hang"  # a runner wedged before its first token; its server still answers
    async with aiohttp.ClientSession() as s:
        status, lines = await streamed(s, f.url, **STRICT)  # only that agent may serve it
        assert status == 502 and lines == [{"error": silent}]
        for _ in range(4):  # others: served by the agent that works, whichever was tried first
            status, lines = await streamed(s, f.url)
            assert status == 200 and lines[-1]["done"] is True
        faulty.fault = "stall"  # wedged after its first token: the stream ends in words
        status, lines = await streamed(s, f.url, **STRICT)
        assert status == 200 and lines[0]["done"] is False and lines[-1] == {"error": silent}
        faulty.fault = "reset"  # cut mid-answer, or before it: the failing agent reports each
        await streamed(s, f.url, **STRICT)
    # every request the failing agent took counts as failed in the fleet's figures, none as served
    # (an answer begun with 200 and cut, too): `corral status` and /api/status report its errors
    async with asyncio.timeout(10):
        statuses = [(await finished.get()).status for _ in range(3)]
    await nc.close()
    assert statuses == [502, 502, 502] and finished.empty()


async def test_a_tripped_agent_is_tried_once_the_others_fail_too(
    both_faulty: tuple[LocalFleet, FaultyOllama, FaultyOllama],
) -> None:
    """A breaker leaves an agent out only while another may serve: the agent it tripped for has
    mended, the other now fails, and the request is served by the one the breaker left out
    rather than answered with the error that tripped it."""
    f, nv_proxy, amd_proxy = both_faulty
    nv_agent = next(a.id for a in f.agents if a.settings.vendor == "nvidia")
    async with aiohttp.ClientSession() as s:
        nv_proxy.fault = "reset"
        status, _, _ = await generate(s, f.url, **STRICT)  # trips nvidia's breaker (5 s)
        assert status == 502
        nv_proxy.fault, amd_proxy.fault = None, "reset"
        status, agent, body = await generate(s, f.url)
        assert status == 200 and agent == nv_agent, body
        assert amd_proxy.hits >= 1  # it went to amd first, as the breaker said


async def test_an_ollama_gone_under_a_backlog_fails_no_more_than_its_agent_had_taken(
    fleet: tuple[LocalFleet, FaultyOllama],
) -> None:
    """An Ollama that stops answering at all (its process gone) while requests wait for slots: its
    agent takes no more work from the fleet queue once one failed, so the backlog goes to the
    agent that works instead of being failed there in a moment; and once that Ollama is back, its
    agent serves again (the gateway's breaker counted the failures it had taken as one)."""
    f, faulty = fleet
    bad = next(a for a in f.agents if a.settings.vendor == "nvidia")
    assert f.gateway is not None
    view = f.gateway.fleet
    faulty.fault, faulty.hits = "down", 0
    async with aiohttp.ClientSession() as s:
        answers = await asyncio.gather(*(generate(s, f.url) for _ in range(3 * REQUESTS)))
        assert all(status == 200 and body["done"] for status, _, body in answers), answers
        assert faulty.hits <= 2 * bad.settings.parallel, faulty.hits  # not the whole backlog
        await until(f, lambda: (a := view.get(bad.id)) is not None and a.ollama_down, what="seen down")
        faulty.fault = None  # back: its next reading says so, and it serves again
        bad._wake.refresh.set()
        await until(f, lambda: (a := view.get(bad.id)) is not None and not a.ollama_down, what="seen up")
        status, agent, body = await generate(s, f.url, **STRICT)
        assert status == 200 and agent == bad.id, body
