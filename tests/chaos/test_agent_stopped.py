"""An agent that stops answering while its state still looks fine (its process stopped with
SIGSTOP, or cut off from NATS: its connection and subscriptions stay open, its last heartbeat is
fresh) costs the gateway one claim timeout, not one per request: after a request sent to it goes
unclaimed, nothing more is sent to it until its state is heard again."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import nats
import pytest
from corral.gateway.app import Gateway
from corral.gateway.settings import GatewaySettings
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import NatsServer
from corral.runtime.process import AsgiServer
from corral.simulator import SimServer, load_config

from tests.integration.fleet_helpers import generate
from tests.integration.waits import views_hold

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
KEY = parse_name(MODEL).key
SLOTS = 2
BODY = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 3}}


async def agent_process(
    nats_url: str, root: str, agent_id: str, ollama_url: str
) -> asyncio.subprocess.Process:
    """``corral agent`` at its default heartbeat (5 s: a stopped agent looks alive for 15 s)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.agent", "--nats-url", nats_url, "--root", root, "--id", agent_id,
        "--ollama-url", ollama_url, "--vendor", "nvidia", "--parallel", str(SLOTS), "--log-level", "WARNING",
    )  # fmt: skip


@pytest.fixture
async def fleet(
    nats_server: NatsServer, root: str
) -> AsyncIterator[tuple[str, list[asyncio.subprocess.Process]]]:
    cfg = load_config(None, time_scale=1.0, num_parallel=SLOTS, decode_rate=4000.0)
    sims = [SimServer(cfg, host="127.0.0.1", port=0) for _ in range(2)]
    procs: list[asyncio.subprocess.Process] = []
    gw = Gateway(GatewaySettings(nats_url=nats_server.url, root=root, port=0, claim_timeout_s=1.0))
    http = AsgiServer(gw, "127.0.0.1", 0)
    try:
        for i, sim in enumerate(sims):
            await sim.start()
            await generate(sim.url, model=MODEL, prompt="")  # warm on both
            procs.append(await agent_process(nats_server.url, root, f"node{i}", sim.url))
        await http.start()
        await views_hold([gw.fleet], lambda view: len(view.loaded_on(KEY)) == 2, timeout=20)
        yield http.url, procs
    finally:
        await http.stop()
        for p in procs:
            if p.returncode is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            await p.wait()
        for sim in sims:
            await sim.stop()


async def failed_attempts(s: aiohttp.ClientSession, url: str) -> float:
    """The gateway's count of attempts that went unclaimed (or otherwise failed) and were retried."""
    async with s.get(url + "/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("corral_gateway_claim_retries_total{") and 'reason="failed"' in line
    )


async def test_a_request_its_claims_took_does_not_wait_on_it_twice(
    fleet: tuple[str, list[asyncio.subprocess.Process]],
) -> None:
    """One at a time, requests go to the claim subscriptions of both agents, the stopped one's
    included (one per slot it had free): each such request waits one claim timeout and then goes
    to an agent that answers, never to the stopped one a second time."""
    url, (stopped, _) = fleet
    os.kill(stopped.pid, signal.SIGSTOP)
    async with aiohttp.ClientSession() as s:
        failures = []
        for _ in range(8 * SLOTS):
            before = await failed_attempts(s, url)
            async with asyncio.timeout(20), s.post(url + "/api/generate", json=BODY) as r:
                assert r.status == 200 and r.headers["X-Corral-Agent"] == "node1"
            failures.append(await failed_attempts(s, url) - before)
    assert sum(failures) >= 1  # the stopped agent's claims took some (else this shows nothing)
    assert max(failures) == 1, failures


async def test_a_stopped_agent_is_sent_nothing_more_once_it_let_a_request_go_unclaimed(
    fleet: tuple[str, list[asyncio.subprocess.Process]], nats_server: NatsServer, root: str
) -> None:
    url, (stopped, _) = fleet
    watcher = await nats.connect(nats_server.url)
    try:
        direct = await watcher.subscribe(Subjects(root).agent_work("node0"))  # what is sent to it
        os.kill(stopped.pid, signal.SIGSTOP)
        async with aiohttp.ClientSession() as s:

            async def one() -> str:
                async with s.post(url + "/api/generate", json=BODY) as r:
                    assert r.status == 200 and (await r.json())["done"]
                    return r.headers["X-Corral-Agent"]

            async def burst() -> list[str]:  # more than the live agent's slots: some are sent elsewhere
                async with asyncio.timeout(20):
                    return await asyncio.gather(*(one() for _ in range(4 * SLOTS)))

            assert set(await burst()) == {"node1"}
            await watcher.flush()
            sent = direct.pending_msgs
            assert sent >= 1  # it was tried, found silent, and the requests went on elsewhere
            for _ in range(3):
                assert set(await burst()) == {"node1"}
            await watcher.flush()
            assert direct.pending_msgs == sent  # nothing more, though its state still looks fine
    finally:
        await watcher.close()
