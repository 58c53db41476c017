"""The agent against a real nats-server and a simulated Ollama: its work intake and slot keeping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import nats
import pytest
from corral.agent.agent import Agent
from corral.agent.settings import AgentSettings
from corral.agent.worker import Job
from corral.protocol import headers as H
from corral.protocol.envelope import RequestEnvelope
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.runtime.nats import round_trip
from corral.runtime.natsserver import NatsServer
from corral.simulator.config import load_config
from corral.simulator.server import SimServer
from corral.up import sim_gpus
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from tests.integration.fleet_helpers import publish_raw

pytestmark = pytest.mark.integration

MODEL = "llama3.2"
TOKEN = parse_name(MODEL).token
BODY = msgspec.json.encode({"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}})


@asynccontextmanager
async def serving(nats_server: NatsServer, root: str, **agent: object) -> AsyncIterator[tuple[Agent, NATS]]:
    """One agent with parallel 1 beside one simulated Ollama, and a client connection."""
    sim = SimServer(load_config(None, time_scale=0.0, num_parallel=1), host="127.0.0.1", port=0)
    await sim.start()
    settings = AgentSettings(
        nats_url=nats_server.url, root=root, id="a1", ollama_url=sim.url, vendor="cpu", parallel=1, **agent
    )
    a = Agent(settings)
    task = asyncio.create_task(a.run())
    nc = await nats.connect(nats_server.url)
    try:
        async with asyncio.timeout(10):
            await a.ready.wait()
        yield a, nc
    finally:
        await nc.close()
        await a.stop()
        await task
        await sim.stop()


async def send(nc: NATS, subject: str, rid: str, headers: dict[str, str] | None = None) -> Subscription:
    """Publish one request for MODEL on ``subject``; the subscription gets its reply stream (on a
    reply subject under the root: agents answer nowhere else)."""
    inbox = f"{subject.split('.', 1)[0]}.reply.test.{nc.new_inbox().rsplit('.', 1)[-1]}"
    sub = await nc.subscribe(inbox)
    if headers is None:
        headers = RequestEnvelope(rid=rid, endpoint="/api/generate", model=TOKEN).headers()
    await nc.publish(subject, BODY, reply=inbox, headers=headers)
    return sub


async def ended(sub: Subscription, timeout: float = 10.0) -> dict[str, str]:
    """The headers of the message that ends a reply stream."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await sub.next_msg(timeout=timeout)
            h = msg.headers or {}
            if h.get(H.KIND) in (H.END_KIND, H.BUSY) or h.get(H.END) == "1":
                return h


async def test_a_waiter_cancelled_as_its_slot_is_handed_over_does_not_lose_the_slot(
    nats_server: NatsServer, root: str
) -> None:
    """A queued request cancelled after the freed slot passed to it, before it resumed, must give
    the slot back: with parallel 1 the model would otherwise never serve on this agent again."""
    async with serving(nats_server, root) as (agent, nc):
        direct = Subjects(root).agent_work(agent.id)
        answered = agent._on_answered

        async def cancel_the_next_in_line(job: object) -> None:
            await answered(job)  # type: ignore[arg-type]
            if getattr(job, "rid", "") == "first":
                waiting = agent._jobs["second"].task
                assert waiting is not None
                waiting.cancel()  # the slot was just handed to it; it has not run yet

        agent._on_answered = cancel_the_next_in_line  # type: ignore[method-assign]
        assert agent._worker is not None
        agent._worker.on_answered = cancel_the_next_in_line
        first = await send(nc, direct, "first")
        second = await send(nc, direct, "second")
        assert await round_trip(nc, 10.0)
        assert (await ended(first)).get(H.STATUS) == "200"
        assert (await ended(second)).get(H.ERROR_CODE) == "cancelled"
        third = await send(nc, direct, "third")
        assert (await ended(third, timeout=5.0)).get(H.STATUS) == "200"
        assert agent.state().in_flight == 0 and agent.state().queued == 0


async def test_a_request_cancelled_before_its_task_first_runs_ends_and_frees_its_slot(
    nats_server: NatsServer, root: str
) -> None:
    """A cancel handled between a job's start and its task's first step: asyncio then never runs
    the task's body, its ``finally`` included, so the reply would stay open after its claim and,
    with parallel 1, the model's only slot would be held for good."""
    async with serving(nats_server, root) as (agent, nc):
        direct = Subjects(root).agent_work(agent.id)
        start = agent._start

        def start_then_cancel(job: Job) -> None:
            start(job)
            if job.rid == "doomed":  # as a cancel handled before the event loop runs the new task
                job.cancel()

        agent._start = start_then_cancel  # type: ignore[method-assign]
        doomed = await send(nc, direct, "doomed")
        assert (await ended(doomed, timeout=5.0)).get(H.ERROR_CODE) == "cancelled"
        after = await send(nc, direct, "after")
        assert (await ended(after, timeout=5.0)).get(H.STATUS) == "200"
        assert agent.state().in_flight == 0 and agent.state().queued == 0
        assert not agent._jobs


GARBAGE = {H.REQUEST: "no spaces allowed", H.ENDPOINT: "/etc/passwd", H.DEADLINE: "soon"}


async def test_garbage_on_the_direct_subject_is_answered_bad_request_and_serving_goes_on(
    nats_server: NatsServer, root: str
) -> None:
    async with serving(nats_server, root) as (agent, nc):
        direct = Subjects(root).agent_work(agent.id)
        bad = await send(nc, direct, "x", headers=GARBAGE)
        end = await ended(bad)
        assert end.get(H.ERROR_CODE) == "bad_request" and end.get(H.AGENT) is None
        await nc.publish(direct, BODY, headers=GARBAGE)  # nowhere to answer: logged and dropped
        await nc.publish(direct, BODY, headers={**GARBAGE, H.REPLY: "not a subject"})
        ok = await send(nc, direct, "fine")
        assert (await ended(ok)).get(H.STATUS) == "200"


async def test_garbage_on_a_claim_subject_is_answered_bad_request_and_the_slot_is_armed_again(
    nats_server: NatsServer, root: str
) -> None:
    async with serving(nats_server, root) as (agent, nc):
        subjects = Subjects(root)
        first = await send(nc, subjects.agent_work(agent.id), "load")
        assert (await ended(first)).get(H.STATUS) == "200"
        await agent._refresh()  # the model is loaded and ran at its default context: warm
        assert TOKEN in agent.runners.warm
        await agent._reconcile()
        assert agent.nc is not None
        assert await round_trip(agent.nc, 10.0)  # its claim subscriptions have reached the server
        claim = subjects.work("any", TOKEN)
        bad = await send(nc, claim, "x", headers=GARBAGE)
        assert (await ended(bad)).get(H.ERROR_CODE) == "bad_request"
        await agent._reconcile()  # the spent subscription is armed again
        assert await round_trip(agent.nc, 10.0)
        ok = await send(nc, claim, "fine")
        assert (await ended(ok)).get(H.STATUS) == "200"
        assert agent.state().in_flight == 0


async def test_a_reply_subject_that_is_not_utf8_does_not_stop_the_agents_connection(
    nats_server: NatsServer, root: str
) -> None:
    """nats-py decodes reply subjects as strict UTF-8 in its read loop; one that is not would end
    the loop, and the agent would read nothing more on a connection that still looks open."""
    async with serving(nats_server, root) as (agent, nc):
        subjects = Subjects(root)
        for subject in (subjects.agent_work(agent.id), subjects.agent_ctl(agent.id)):
            await publish_raw(nats_server, subject, b"x.\xff\xfe", BODY)
        ok = await send(nc, subjects.agent_work(agent.id), "after")
        assert (await ended(ok, timeout=5.0)).get(H.STATUS) == "200"
        assert agent.nc is not None and agent.nc.is_connected


async def test_a_control_message_is_acked_with_an_empty_message_not_an_echo_of_its_headers(
    nats_server: NatsServer, root: str
) -> None:
    async with serving(nats_server, root) as (agent, nc):
        ctl = Subjects(root).agent_admin(agent.id)
        ack = await nc.request(ctl, b"", headers={H.CTL: H.CORDON, H.KIND: H.END_KIND}, timeout=5)
        assert (ack.headers, ack.data) == (None, b"") and agent.status == "cordoned"
        ack = await nc.request(ctl, b"", headers={H.CTL: H.UNCORDON}, timeout=5)
        assert (ack.headers, ack.data) == (None, b"") and agent.status == "active"


async def test_an_agent_answers_only_under_the_root_and_asks_its_ollama_only_what_ollama_serves(
    nats_server: NatsServer, root: str
) -> None:
    """A request cannot aim the agent's answer at a KV key (an empty claim there would delete that
    agent from every view) nor make it send any method and path to its Ollama."""
    async with serving(nats_server, root) as (agent, nc):
        subjects = Subjects(root)
        direct = subjects.agent_work(agent.id)
        kv = await nc.jetstream().key_value(subjects.agents_bucket)
        victim = msgspec.json.encode({"id": "victim", "host": "h", "vendor": "cpu", "ollama_url": "http://x"})
        before = await kv.put("victim", victim)
        target = f"$KV.{subjects.agents_bucket}.victim"
        good = RequestEnvelope(rid="h1", endpoint="/api/generate", model=TOKEN).headers()
        await nc.publish(direct, BODY, headers={**good, H.REPLY: target})
        await nc.publish(direct, BODY, reply=target, headers=good)
        await nc.publish(direct, BODY, reply="_INBOX.elsewhere", headers=good)
        for method, endpoint in (("GET", "/api/generate"), ("POST", "/api/blobs/x"), ("DELETE", "/api/tags")):
            headers = RequestEnvelope(rid="h2", endpoint=endpoint, method=method).headers()
            refused = await send(nc, direct, "h2", headers=headers)
            assert (await ended(refused)).get(H.ERROR_CODE) == "bad_request"
        ok = await send(nc, direct, "fine")
        assert (await ended(ok)).get(H.STATUS) == "200"
        entry = await kv.get("victim")
        assert (entry.revision, entry.value) == (before, victim)
        assert agent.state().in_flight == 0


async def test_direct_work_before_the_agent_runs_is_answered_busy(nats_server: NatsServer, root: str) -> None:
    """An agent announces itself (its state in KV) before its task group runs; a direct request a
    gateway sends in that moment is answered ``busy``, so the gateway tries elsewhere at once."""
    sim = SimServer(load_config(None, time_scale=0.0, num_parallel=1), host="127.0.0.1", port=0)
    await sim.start()
    settings = AgentSettings(
        nats_url=nats_server.url, root=root, id="a1", ollama_url=sim.url, vendor="cpu", parallel=1
    )
    a = Agent(settings)
    nc = await nats.connect(nats_server.url)
    try:
        await a._open()  # subscribed and announced; `run` has not entered its task group
        sub = await send(nc, Subjects(root).agent_work("a1"), "early")
        assert (await ended(sub)).get(H.KIND) == H.BUSY
    finally:
        await nc.close()
        await a._close()
        await sim.stop()


async def test_a_model_stays_busy_in_the_agents_state_for_a_request_time_after_its_request_ended(
    nats_server: NatsServer, root: str
) -> None:
    """Routers read ``busy_models`` to spare a model in use: one between two requests of a steady
    stream is still in use, for about one of its request times after the last one ended."""
    sim = SimServer(load_config(None, time_scale=1.0, num_parallel=1), host="127.0.0.1", port=0)
    await sim.start()
    a = Agent(AgentSettings(nats_url=nats_server.url, root=root, id="a1", ollama_url=sim.url, parallel=1))
    task = asyncio.create_task(a.run())
    nc = await nats.connect(nats_server.url)
    try:
        async with asyncio.timeout(10):
            await a.ready.wait()
        body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 40}}
        key = parse_name(MODEL).key
        for rid in ("r1", "r2"):  # the second runs on the loaded model: its time is the request's own
            headers = RequestEnvelope(rid=rid, endpoint="/api/generate", model=TOKEN).headers()
            inbox = f"{root}.reply.test.{rid}"
            sub = await nc.subscribe(inbox)
            await nc.publish(
                Subjects(root).agent_work("a1"), msgspec.json.encode(body), reply=inbox, headers=headers
            )
            assert (await ended(sub)).get(H.STATUS, "200") == "200"
            assert await round_trip(nc, 10.0)
        assert a.runners.request_s[key] >= 0.1  # long enough for the reading below to fall inside it
        assert a.state().in_flight == 0 and a.slots.busy_tokens() == set()  # no request holds a slot
        assert a.state().busy_models == (key,)
    finally:
        await nc.close()
        await a.stop()
        await task
        await sim.stop()


async def test_a_request_for_a_model_a_load_under_way_unloads_is_turned_away_not_loaded_back(
    nats_server: NatsServer, root: str
) -> None:
    """On an 8 GiB card ``qwen3:8b``'s runner does not fit beside ``llama3.2``'s (Ollama's 80 % rule):
    its load unloads llama3.2 first. A llama3.2 request that reaches the agent meanwhile is answered
    busy (the gateway sends it elsewhere). Sent on, it would wait behind the load in Ollama and then
    unload qwen3 to load llama3.2 back, before any of qwen3's own requests ran."""
    cfg = load_config(None, time_scale=0.0, num_parallel=1, vendor="nvidia", vram_gb=8)
    sim = SimServer(cfg, host="127.0.0.1", port=0)
    await sim.start()
    settings = AgentSettings(
        nats_url=nats_server.url, root=root, id="a1", ollama_url=sim.url, vendor="nvidia", parallel=1
    )
    a = Agent(settings, gpus=sim_gpus(cfg))
    task = asyncio.create_task(a.run())
    nc = await nats.connect(nats_server.url)
    small, big = parse_name(MODEL), parse_name("qwen3:8b")
    subject = Subjects(root).agent_work("a1")

    async def sent(model: str, rid: str) -> Subscription:
        inbox = f"{root}.reply.test.{rid}"
        sub = await nc.subscribe(inbox)
        body = msgspec.json.encode(
            {"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
        )
        headers = RequestEnvelope(rid=rid, endpoint="/api/generate", model=parse_name(model).token).headers()
        await nc.publish(subject, body, reply=inbox, headers=headers)
        return sub

    try:
        async with asyncio.timeout(10):
            await a.ready.wait()
        assert (await ended(await sent(MODEL, "warm-up"))).get(H.STATUS, "200") == "200"
        load = await sent("qwen3:8b", "load")  # the agent starts it first: the next one finds it yielding
        turned = await sent(MODEL, "meanwhile")
        assert (await ended(turned)).get(H.KIND) == H.BUSY
        assert (await ended(load)).get(H.STATUS, "200") == "200"
        assert sim.stats.model(small.key).loads == 1 and sim.stats.model(big.key).loads == 1
        assert sim.stats.evictions == 1  # llama3.2, once, and nothing loaded back over qwen3
        assert not a.runners.yields(small.token)  # the load is over
    finally:
        await nc.close()
        await a.stop()
        await task
        await sim.stop()
