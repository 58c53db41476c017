"""Agents are killed (SIGKILL, real processes) while requests are in flight."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import ollama
import pytest
from corral.gateway.app import Gateway
from corral.gateway.settings import GatewaySettings
from corral.runtime.natsserver import NatsServer
from corral.runtime.process import AsgiServer
from corral.simulator import SimServer, load_config

from tests.integration.fleet_helpers import generate
from tests.integration.waits import views_hold

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "llama3.2"


@dataclass
class Node:
    sim: SimServer
    proc: asyncio.subprocess.Process
    id: str


@dataclass
class Rig:
    gateway: Gateway
    url: str
    nodes: list[Node]

    def node_serving(self) -> Node:
        """The node whose simulator has a request in progress."""
        busy = [n for n in self.nodes if n.sim.stats.started > n.sim.stats.finished + n.sim.stats.cancelled]
        assert len(busy) == 1, [n.sim.stats for n in self.nodes]
        return busy[0]

    async def wait_agents(self, n: int, timeout: float = 15.0) -> None:
        await views_hold([self.gateway.fleet], lambda view: len(view.agents()) >= n, timeout=timeout)


async def spawn_agent(nats_url: str, root: str, agent_id: str, ollama_url: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "CORRAL_HEARTBEAT_S": "0.5",
        "CORRAL_PING_INTERVAL_S": "0.2",
        "CORRAL_REFRESH_S": "0.5",
        "CORRAL_LOG_LEVEL": "WARNING",
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral.agent",
        "--nats",
        nats_url,
        "--root",
        root,
        "--id",
        agent_id,
        "--ollama",
        ollama_url,
        "--vendor",
        "nvidia",
        "--parallel",
        "4",
        env=env,
    )


@pytest.fixture
async def rig(nats_server: NatsServer, root: str) -> AsyncIterator[Rig]:
    # loads take ~1.5 s (a window to kill in), decoding is fast
    cfg = load_config(None, time_scale=1.0, load_overhead_s=1.5, num_parallel=4, decode_rate=4000.0)
    sims = [SimServer(cfg, host="127.0.0.1", port=0) for _ in range(2)]
    for s in sims:
        await s.start()
    procs = [await spawn_agent(nats_server.url, root, f"node{i}", s.url) for i, s in enumerate(sims)]
    settings = GatewaySettings(
        nats_url=nats_server.url,
        root=root,
        port=0,
        claim_timeout_s=1.0,
        idle_timeout_s=1.0,
        queue_timeout_s=10.0,
    )
    gw = Gateway(settings)
    http = AsgiServer(gw, "127.0.0.1", 0)
    await http.start()
    rig = Rig(
        gw, http.url, [Node(s, p, f"node{i}") for i, (s, p) in enumerate(zip(sims, procs, strict=True))]
    )
    try:
        await rig.wait_agents(2)
        yield rig
    finally:
        await http.stop()
        for p in procs:
            if p.returncode is None:
                p.terminate()
            await p.wait()
        for s in sims:
            await s.stop()


async def test_agent_killed_before_first_byte_is_retried(rig: Rig) -> None:
    async with ollama.AsyncClient(host=rig.url) as client:
        await _killed_before_first_byte(rig, client)


async def _killed_before_first_byte(rig: Rig, client: ollama.AsyncClient) -> None:
    request = asyncio.create_task(client.generate(model=MODEL, prompt="hello", options={"num_predict": 5}))
    # the model is cold: one agent claims it and its Ollama starts loading
    waits = [
        asyncio.ensure_future(n.sim.stats.wait_for(lambda st: st.loads > 0, timeout=10)) for n in rig.nodes
    ]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    victim = next(n for n in rig.nodes if n.sim.stats.loads > 0)
    victim.proc.kill()
    r = await asyncio.wait_for(request, 20)
    assert r.done and r.response  # the client never noticed
    survivor = next(n for n in rig.nodes if n is not victim)
    assert survivor.sim.stats.finished == 1


async def test_agent_killed_mid_stream_ends_with_error_line(rig: Rig) -> None:
    for n in rig.nodes:
        await generate(n.sim.url, model=MODEL, prompt="")  # warm both
    lines: list[dict[str, object]] = []
    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "go", "options": {"num_predict": 1_000_000}}
        async with s.post(rig.url + "/api/generate", json=body) as r:
            assert r.status == 200
            lines.append(json.loads(await r.content.readline()))
            rig.node_serving().proc.kill()
            async with asyncio.timeout(10):  # ends within the idle timeout, never hangs
                lines.extend([json.loads(raw) async for raw in r.content])
    assert lines[0]["done"] is False
    assert "error" in lines[-1] and not any(line.get("done") for line in lines)


async def test_no_request_lost_when_an_agent_dies(rig: Rig) -> None:
    for n in rig.nodes:
        await generate(n.sim.url, model=MODEL, prompt="")
    await asyncio.gather(*(n.sim.stats.wait_for(lambda st: st.loads_completed > 0) for n in rig.nodes))
    async with ollama.AsyncClient(host=rig.url) as client:
        await _no_request_lost(rig, client)


async def _no_request_lost(rig: Rig, client: ollama.AsyncClient) -> None:
    reqs = [
        asyncio.create_task(client.generate(model=MODEL, prompt=f"{i}", options={"num_predict": 400}))
        for i in range(16)
    ]
    await asyncio.gather(*(n.sim.stats.wait_for(lambda st: st.started > 0) for n in rig.nodes))
    rig.nodes[0].proc.kill()
    results = await asyncio.wait_for(asyncio.gather(*reqs), 30)
    assert all(r.done and r.response for r in results)
