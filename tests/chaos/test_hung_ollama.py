"""An Ollama that hangs (its process stopped with SIGSTOP: connections are accepted, nothing is
answered) ends the requests waiting on it with an error instead of leaving them open for good, and
the fleet routes around it; once it runs again it serves again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from corral.agent import ollama as agent_ollama
from corral.protocol.messages import TagModel
from corral.protocol.names import parse_name
from corral.runtime.natsserver import NatsServer, free_port
from corral.up import Backend, FleetOptions, LocalFleet, default_sims

from bench.common import wait_port
from tests.integration.fleet_helpers import preload, until

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
KEY = parse_name(MODEL).key
CONTROL_TIMEOUT_S = 1.0  # the agent's own calls to its Ollama (10 s in production)
SIM_TOML = 'reply_tokens = [100000, 100000]\ngpus = [{ name = "hang", vram_gb = 24 }]\n'


@contextlib.asynccontextmanager
async def sim_process(config: Path) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """``corral sim`` as its own process (so it can be stopped), on a free port."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "sim", "--port", str(port), "--config", str(config),
        "--log-level", "WARNING",
    )  # fmt: skip
    try:
        await wait_port(port, None, 20)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        await proc.wait()


async def test_a_hung_ollama_ends_its_requests_and_is_routed_around(
    nats_server: NatsServer, root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_ollama, "CONTROL_TIMEOUT_S", CONTROL_TIMEOUT_S)
    config = tmp_path / "sim.toml"
    config.write_text(SIM_TOML)
    async with sim_process(config) as (url_a, proc_a), sim_process(config) as (url_b, proc_b):
        options = FleetOptions(
            port=0,
            nats_url=nats_server.url,
            root=root,
            backends=[
                Backend(url=url_a, vendor="nvidia", parallel=2),
                Backend(url=url_b, vendor="nvidia", parallel=2),
            ],
            agent={"refresh_s": 0.5, "heartbeat_s": 0.5},
            aggregator=None,
        )
        async with LocalFleet(options) as fleet, aiohttp.ClientSession() as s:
            assert fleet.gateway is not None
            view = fleet.gateway.fleet
            for url in (url_a, url_b):  # warm on both
                async with s.post(url + "/api/generate", json={"model": MODEL, "prompt": ""}) as r:
                    assert r.status == 200
            await until(fleet, lambda: len(view.loaded_on(KEY)) == 2, what="warm on both")
            body = {"model": MODEL, "prompt": "a long story"}
            async with s.post(fleet.url + "/api/generate", json=body) as r:
                assert r.status == 200
                assert "response" in msgspec.json.decode(await r.content.readline())  # streaming
                serving = next(a for a in fleet.agents if a.slots.in_flight)
                hung = proc_a if serving.settings.ollama_url == url_a else proc_b
                os.kill(hung.pid, signal.SIGSTOP)
                async with asyncio.timeout(15):  # the refresh, the control timeout, the error line
                    lines = [msgspec.json.decode(line) async for line in r.content]
            assert "not answering" in lines[-1]["error"] and not lines[-1].get("done")
            # routed around: the hung one shows no models, and a request is served by the other
            await until(fleet, lambda: not view.loaded_on(KEY) or len(view.loaded_on(KEY)) == 1)
            short = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 3}}
            async with asyncio.timeout(15), s.post(fleet.url + "/api/generate", json=short) as r:
                assert r.status == 200 and (await r.json())["done"]
            os.kill(hung.pid, signal.SIGCONT)
            await until(fleet, lambda: len(view.loaded_on(KEY)) == 2, timeout=15, what="back")


async def test_a_slow_reading_does_not_fail_a_stream_its_ollama_is_still_feeding(
    nats_server: NatsServer, root: str
) -> None:
    """A reading of Ollama that times out while tokens still flow to a request (a busy server slow
    to list its models) ends nothing: only requests that heard nothing all that while fail."""
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=1.0, reply_tokens=[400, 400]),  # ~3 s of tokens
        agent={"refresh_s": 3600.0},  # only the reading below
        aggregator=None,
    )
    async with LocalFleet(options) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)
        agent = fleet.agents[0]

        async def slow_tags() -> list[TagModel]:
            await asyncio.sleep(0.5)  # a server slow to answer, while it streams: the stand-in's delay
            raise TimeoutError

        body = {"model": MODEL, "prompt": "a story", "options": {"num_predict": 1000}}
        async with s.post(fleet.url + "/api/generate", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # tokens are flowing
            agent.ollama.tags = slow_tags  # type: ignore[method-assign]
            await agent._refresh()  # the reading times out: the server reads as hung
            assert agent._backend.hung
            lines = [msgspec.json.decode(line) async for line in r.content]
        assert lines[-1]["done"] is True and not any("error" in x for x in lines)
