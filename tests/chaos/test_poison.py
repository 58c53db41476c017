"""An agent never dies of one message, and a poisoned queued request leaves the queue instead of
waiting in it (that no other agent gets it again is `tests/integration/test_workqueue.py`'s).

The agent runs as a real process beside a simulated Ollama; a gateway (in this process) fronts it.
Hostile messages arrive on every subject the agent listens on — its direct and control subjects,
the claim subject of its warm model, the fleet queue — and its NATS goes away in the middle of a
streamed answer. After each, the agent process is still running, logged no traceback, and serves
a plain request through the gateway.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import msgspec
import pytest
from corral.protocol import headers as H
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.runtime.nats import connect, round_trip
from corral.runtime.natsserver import NatsServer
from corral.runtime.workqueue import depths, enqueue, ensure_stream
from corral.simulator.config import load_config
from corral.simulator.server import SimServer
from corral.up import FleetOptions, LocalFleet

from tests.integration.fleet_helpers import publish_raw
from tests.integration.waits import until

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
TOKEN = parse_name(MODEL).token
AGENT = "poisoned"
WITHIN_S = 20.0
BODY = msgspec.json.encode({"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}})


@dataclass
class AgentProcess:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    serving: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if "serving" in line:
                self.serving.set()

    def assert_alive_and_clean(self) -> None:
        assert self.proc.returncode is None, "".join(self.lines[-40:])
        assert not any("Traceback" in line for line in self.lines), "".join(self.lines)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(load_config(None, time_scale=0.01, num_parallel=1), host="127.0.0.1", port=0) as s:
        yield s


@pytest.fixture
async def agent(server: NatsServer, sim: SimServer, root: str) -> AsyncIterator[AgentProcess]:
    env = {**os.environ, "CORRAL_LOG_LEVEL": "INFO", "CORRAL_HEARTBEAT_S": "0.5", "CORRAL_REFRESH_S": "0.5"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.agent", "--nats", server.url, "--root", root,
        "--id", AGENT, "--ollama", sim.url, "--vendor", "nvidia", "--parallel", "1",
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    a = AgentProcess(proc)
    reader = asyncio.create_task(a.read())
    try:
        await asyncio.wait_for(a.serving.wait(), WITHIN_S)
        yield a
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), WITHIN_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await reader


@pytest.fixture
async def fleet(server: NatsServer, agent: AgentProcess, root: str) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0, nats_url=server.url, root=root, registry=None, aggregator=None,
        gateway={"queue_timeout_s": 5.0, "idle_timeout_s": 5.0},
    )  # fmt: skip
    async with LocalFleet(options) as f:
        assert f.gateway is not None
        gateway = f.gateway
        await until(
            lambda: gateway.fleet.heard(AGENT) is not None,
            lambda left: gateway.fleet.wait_changed(min(left, 0.5)),
            timeout=WITHIN_S,
            what=f"the gateway hears agent {AGENT}",
        )
        await _plain(f)  # loads the model: the agent now holds a claim subscription for it
        yield f


async def _plain(fleet: LocalFleet) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fleet.url}/api/generate", data=BODY) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["done"] is True


async def _heard_since(fleet: LocalFleet, since: float) -> None:
    assert fleet.gateway is not None
    view = fleet.gateway.fleet
    await until(
        lambda: (t := view.heard(AGENT)) is not None and t > since,
        lambda left: view.wait_changed(min(left, 0.5)),
        timeout=WITHIN_S,
        what=f"a new state of agent {AGENT} heard",
    )


BAD_HEADERS = [
    {H.REQUEST: "no spaces allowed", H.ENDPOINT: "/api/generate"},
    {H.REQUEST: "r1", H.ENDPOINT: "/api/../../etc/passwd"},
    {H.REQUEST: "r2", H.ENDPOINT: "/api/generate", H.METHOD: "GET / HTTP/1.1"},
    {H.REQUEST: "r3", H.ENDPOINT: "/api/generate", H.DEADLINE: "soon"},
    {H.REQUEST: "r4", H.ENDPOINT: "/api/generate", H.BODY_SIZE: "12"},  # no origin to fetch it from
    {H.REQUEST: "r5", H.ENDPOINT: "/api/generate", H.NUM_CTX: "-1", H.MODEL: TOKEN},
    {H.REQUEST: "r6", H.ENDPOINT: "/api/generate", H.MODEL: "not a token"},
    {H.REQUEST: "r7", H.ENDPOINT: "/api/generate", H.TRACEPARENT: "00-" + "z" * 60},
    {H.CTL: "explode"},
    {},
]


async def test_hostile_messages_on_every_subject_leave_the_agent_serving(
    server: NatsServer, agent: AgentProcess, fleet: LocalFleet, root: str
) -> None:
    subjects = Subjects(root)
    nc = await connect(server.url, name="hostile")
    try:
        targets = [subjects.agent_work(AGENT), subjects.agent_ctl(AGENT), subjects.work("any", TOKEN)]
        for subject in targets:
            for hdrs in BAD_HEADERS:
                await nc.publish(subject, BODY, reply=nc.new_inbox(), headers=hdrs or None)
                await nc.publish(subject, b"\xff" * 64, headers=hdrs or None)  # no reply subject
            good = {H.REQUEST: "r8", H.ENDPOINT: "/api/generate", H.MODEL: TOKEN}
            await nc.publish(subject, BODY, headers={**good, H.REPLY: "not a subject"})
            await publish_raw(server, subject, b"x.\xff\xfe", BODY)  # a reply subject not UTF-8
        assert await round_trip(nc, 10.0)
        await _heard_since(fleet, time.monotonic())  # it still heartbeats after reading them all
        await _plain(fleet)
    finally:
        await nc.close()
    agent.assert_alive_and_clean()


async def test_poisoned_queued_requests_are_taken_off_the_queue_and_serving_goes_on(
    server: NatsServer, agent: AgentProcess, fleet: LocalFleet, root: str
) -> None:
    subjects = Subjects(root)
    nc = await connect(server.url, name="hostile")
    try:
        js = nc.jetstream()
        await ensure_stream(js, subjects)
        reply = nc.new_inbox()
        for hdrs in BAD_HEADERS[:8]:
            await enqueue(nc, js, subjects, "any", TOKEN, BODY, {**hdrs, H.REPLY: reply})
        async with asyncio.timeout(WITHIN_S):  # the agent took every one, and none came back
            while sum((await depths(nc, subjects)).values()):
                await _heard_since(fleet, time.monotonic())  # woken by each heartbeat
        await _plain(fleet)
    finally:
        await nc.close()
    agent.assert_alive_and_clean()


async def test_nats_gone_in_the_middle_of_a_streamed_answer(
    server: NatsServer, agent: AgentProcess, fleet: LocalFleet
) -> None:
    """The agent's output to a NATS that went away is buffered or dropped, never fatal; the
    client's stream ends (finished or with an error), and the agent serves once NATS is back."""
    body = {"model": MODEL, "prompt": "tell me a long story", "options": {"num_predict": 100000}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WITHIN_S * 2)) as s:
        async with s.post(f"{fleet.url}/api/generate", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # tokens are flowing
            await server.kill()
            await server.start()
            lines = [line async for line in r.content]  # ends, one way or the other
        assert lines, "the stream ended without a last line"
        last = msgspec.json.decode(lines[-1])
        assert last.get("done") is True or "error" in last
    await _heard_since(fleet, time.monotonic())
    await _plain(fleet)
    agent.assert_alive_and_clean()
