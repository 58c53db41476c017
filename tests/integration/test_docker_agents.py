"""`corral agent --docker` against a stand-in Docker engine (the Engine API over a unix socket, read
by the real `docker` client) whose "containers" are simulators: one agent per running Ollama
container, with its vendor and slots; a stopped container leaves at once, a started one joins
within a second; other containers are ignored; ``--metrics-port`` serves every agent's series."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from corral.runtime.natsserver import NatsServer
from corral.simulator import SimServer, load_config

from tests.integration.agents_kv import AgentsWatch
from tests.integration.fake_docker import FakeDockerEngine, container

pytestmark = pytest.mark.integration

JOIN_S = 1.0  # a started container's agent is in the fleet within this


@pytest.fixture
async def engine() -> AsyncIterator[FakeDockerEngine]:
    folder = tempfile.mkdtemp(prefix="corral-docker-")  # short: a unix socket path has ~100 bytes
    fake = FakeDockerEngine(os.path.join(folder, "docker.sock"))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
        shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def load_model(url: str, model: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(url + "/api/generate", json={"model": model}) as r:
        assert r.status == 200, await r.text()


async def scrape(port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        return await r.text()


async def sim(vendor: str) -> SimServer:
    server = SimServer(load_config(None, vendor=vendor, time_scale=0), host="127.0.0.1", port=0)
    await server.start()
    return server


async def test_one_agent_per_running_ollama_container(
    nats_server: NatsServer, root: str, engine: FakeDockerEngine
) -> None:
    nvidia, amd, web = await sim("nvidia"), await sim("amd"), await sim("cpu")
    a = engine.add(container("ollama-a", host_port=nvidia.port, env=("OLLAMA_NUM_PARALLEL=3",), nvidia=True))
    b = engine.add(
        container("ollama-b", image="ollama/ollama:rocm", host_port=amd.port, kfd=True), running=False
    )
    engine.add(container("web", image="nginx:1.27", host_port=web.port))  # answers HTTP, is no Ollama
    env = {
        **os.environ,
        "DOCKER_HOST": engine.url,  # as the docker package reads it
        "CORRAL_NATS_URL": nats_server.url,
        "CORRAL_ROOT": root,
        "CORRAL_ADVERTISE_HOST": "box",
        "CORRAL_PARALLEL": "2",  # for containers that do not say
        "CORRAL_VRAM_GB": "24",
        "CORRAL_DRAIN_GRACE_S": "5",
        "CORRAL_REFRESH_S": "0.2",
        "CORRAL_METRICS_PORT": str(metrics_port := free_port()),
    }
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.agent", "--docker", env=env, stderr=asyncio.subprocess.PIPE
    )
    output: list[bytes] = []

    async def read() -> None:
        assert agent.stderr is not None
        while line := await agent.stderr.readline():
            output.append(line)

    reader = asyncio.create_task(read())
    try:
        async with AgentsWatch(nats_server.url, root) as fleet:
            await fleet.until("the running Ollama container's agent", lambda f: "box-ollama-a" in f, 30)
            state = fleet.agents["box-ollama-a"]
            assert (state.vendor, state.parallel, state.ollama_url) == ("nvidia", 3, nvidia.url)
            assert state.ollama_version  # it reads that Ollama

            amd_started = time.monotonic()
            engine.start_container(b)
            await fleet.until("a started container's agent", lambda f: "box-ollama-b" in f, JOIN_S)
            took = time.monotonic() - amd_started
            state = fleet.agents["box-ollama-b"]
            assert (state.vendor, state.parallel, state.ollama_url) == ("amd", 2, amd.url)

            # one metrics port for the process: every agent's series, labelled by its id
            for server in (nvidia, amd):
                await load_model(server.url, "llama3.2")
            await fleet.until(
                "both agents showing the model loaded",
                lambda f: all(f[a].loaded for a in ("box-ollama-a", "box-ollama-b")),
                10,
            )
            scraped = await scrape(metrics_port)
            for agent_id, slots in (("box-ollama-a", 3), ("box-ollama-b", 2)):
                assert (
                    f'corral_agent_slots_free{{agent="{agent_id}",model="llama3.2:latest"}} {slots}.0'
                    in scraped
                )

            engine.stop_container(a)
            await fleet.until("a stopped container leaving", lambda f: "box-ollama-a" not in f, JOIN_S)
            assert set(fleet.agents) == {"box-ollama-b"}  # never one for the web server
            assert all("web" not in key for key, _ in fleet.history)

            agent.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(agent.wait(), 20) == 0
            await fleet.until("the last agent leaving on SIGTERM", lambda f: not f, 5)
    except BaseException:
        sys.stderr.write(b"".join(output[-40:]).decode(errors="replace"))
        raise
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
        await reader
        for server in (nvidia, amd, web):
            await server.stop()
    assert took < JOIN_S, took
