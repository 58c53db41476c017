"""Work whose requester is gone stops at its Ollama instead of generating for nobody: a gateway
killed mid-stream (SIGKILL, a real process), a gateway restarted under the same id, a direct NATS
requester that stops listening. A requester that stops listening for a moment (a reconnect) keeps
its request."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import nats
import pytest
from corral.agent import probes
from corral.protocol import headers as H
from corral.protocol.envelope import RequestEnvelope
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import NatsServer, free_port
from corral.simulator.stats import SimStats
from corral.up import FleetOptions, LocalFleet, default_sims

from bench.common import wait_port
from tests.integration.fleet_helpers import preload, until

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
PING_S = 0.2  # the agent's ping interval: a probe of each requester this often
LONG = {"model": MODEL, "prompt": "a long story"}  # ~30 minutes of tokens at the simulator's pace


def options(nats_server: NatsServer, root: str) -> FleetOptions:
    return FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=1.0, reply_tokens=[100_000, 100_000]),
        agent={"ping_interval_s": PING_S},
        aggregator=None,
    )


@contextlib.asynccontextmanager
async def gateway_process(
    nats_server: NatsServer, root: str, gateway_id: str = ""
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """``corral gateway`` as its own process (so it can be killed), on a free port."""
    port = free_port()
    args = ["--nats-url", nats_server.url, "--root", root, "--port", str(port), "--log-level", "WARNING"]
    if gateway_id:
        args += ["--gateway-id", gateway_id]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "corral.gateway", *args)
    try:
        await wait_port(port, None, 20)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def stream_then_kill(s: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process) -> None:
    """Start a long streamed generate through the gateway at ``url``; once tokens flow, SIGKILL it."""
    async with s.post(url + "/api/generate", json=LONG) as r:
        assert r.status == 200
        assert "response" in msgspec.json.decode(await r.content.readline())
        proc.kill()
        await proc.wait()


async def stopped_at_ollama(stats: SimStats, timeout: float = 20.0) -> None:
    await stats.wait_for(lambda st: st.cancelled >= 1, timeout=timeout)


async def test_a_killed_gateways_stream_stops_at_its_ollama(nats_server: NatsServer, root: str) -> None:
    async with LocalFleet(options(nats_server, root)) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)
        sim = fleet.sims[0].stats
        async with gateway_process(nats_server, root) as (url, proc):
            await stream_then_kill(s, url, proc)
        assert sim.cancelled == 0
        await stopped_at_ollama(sim)  # MISSES probes met nobody: not after the reply's ~30 minutes
        # the agent frees the slot once its call to Ollama has ended, a moment after Ollama saw it end
        await until(fleet, lambda: not fleet.agents[0].slots.in_flight, what="the agent's slot freed")


async def test_a_gateway_restarted_under_the_same_id_drops_what_its_last_life_sent(
    nats_server: NatsServer, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its reply subjects have a listener again, so probes reach it: the new gateway itself answers
    the first ping of a request it never sent with a cancel."""
    monkeypatch.setattr(probes, "MISSES", 10**9)  # only the restarted gateway can end it
    async with LocalFleet(options(nats_server, root)) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)
        sim = fleet.sims[0].stats
        async with gateway_process(nats_server, root, "gw-fixed") as (url, proc):
            await stream_then_kill(s, url, proc)
        assert sim.cancelled == 0
        async with gateway_process(nats_server, root, "gw-fixed"):
            await stopped_at_ollama(sim)


async def test_a_requester_away_for_a_moment_keeps_its_request_and_one_gone_for_good_does_not(
    nats_server: NatsServer, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct NATS requester stops listening for a few probes (as across a reconnect) and listens
    again, twice: its request goes on, though more probes than `MISSES` met nobody in all. Then it
    stops listening for good, and the request stops at its Ollama."""
    misses: asyncio.Queue[int] = asyncio.Queue()  # the probes NATS answered "no responders" to
    missed = probes.Probes.missed

    def counted(self: probes.Probes, n: int) -> bool:
        misses.put_nowait(n)
        return missed(self, n)

    monkeypatch.setattr(probes.Probes, "missed", counted)
    async with LocalFleet(options(nats_server, root)) as fleet:
        await preload(fleet, MODEL)
        sim, agent = fleet.sims[0].stats, fleet.agents[0]
        subjects = Subjects(root)
        nc = await nats.connect(nats_server.url)
        try:
            reply = subjects.reply("direct", "r1")
            listening = await nc.subscribe(reply)
            env = RequestEnvelope(rid="r1", endpoint="/api/generate", model=parse_name(MODEL).token)
            await nc.publish(
                subjects.agent_work(agent.id), msgspec.json.encode(LONG), reply=reply, headers=env.headers()
            )
            await pings(listening, 1)  # claimed, and its stream flows
            for _ in range(2):  # away twice, each time for fewer probes than MISSES, in all for more
                await listening.unsubscribe()
                for _ in range(probes.MISSES - 2):
                    await asyncio.wait_for(misses.get(), 10)
                listening = await nc.subscribe(reply)
                await pings(listening, 2)
            assert sim.cancelled == 0 and agent.slots.in_flight
            await listening.unsubscribe()
            await stopped_at_ollama(sim)
        finally:
            await nc.close()


async def pings(sub: nats.aio.subscription.Subscription, count: int) -> None:
    """Until ``count`` pings arrived on ``sub`` (data between them is skipped)."""
    seen = 0
    async with asyncio.timeout(10 + count * PING_S * 2):
        while seen < count:
            msg = await sub.next_msg(timeout=10)
            seen += (msg.headers or {}).get(H.KIND) == H.PING


async def test_a_queued_request_of_a_killed_gateway_is_dropped_at_its_claim(
    nats_server: NatsServer, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway dies with a request waiting in the fleet queue. The agent that takes it claims it
    and nobody hears the claim: it drops it at once (its pings alone would take about 10 s, and
    here never), and the slot serves the next request."""
    monkeypatch.setattr(probes, "MISSES", 10**9)  # only the claim can tell
    one_slot = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=1.0, num_parallel=1, reply_tokens=[100_000, 100_000]),
        agent={"parallel": 1},
        gateway={"queue_timeout_s": 60.0},
        aggregator=None,
    )
    async with LocalFleet(one_slot) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)
        assert fleet.gateway is not None and fleet.gateway.nc is not None
        nudges = await fleet.gateway.nc.subscribe(f"{root}.queued.>")  # one per request queued
        async with s.post(fleet.url + "/api/generate", json=LONG) as hold:  # the one slot, held
            assert hold.status == 200
            await hold.content.readline()
            async with gateway_process(nats_server, root) as (url, proc):
                orphan = asyncio.create_task(s.post(url + "/api/generate", json=LONG))
                await nudges.next_msg(timeout=20)  # it waits in the fleet queue
                proc.kill()
                await proc.wait()
                with contextlib.suppress(aiohttp.ClientError):
                    await orphan
        # the slot frees; the orphan is taken first (the queue is first in, first out)
        body = {"model": MODEL, "prompt": "next", "stream": False, "options": {"num_predict": 3}}
        async with asyncio.timeout(20), s.post(fleet.url + "/api/generate", json=body) as r:
            assert r.status == 200 and (await r.json())["done"]
