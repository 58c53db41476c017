"""The transport over a real nats-server, with hand-written agents: a reply owns its call, and a
fan-out leaves nothing behind however one of its reads ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from corral.protocol import headers as H
from corral.protocol.errors import AgentUnavailable
from corral.protocol.messages import AgentState, TagModel
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import ensure_buckets
from corral.runtime.fleet import FleetView
from corral.runtime.nats import round_trip
from corral.runtime.natsserver import NatsServer, free_port
from corral.transport import Outcome, Reply, Transport, WorkRequest, fan_out
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

pytestmark = pytest.mark.integration

NDJSON = "application/x-ndjson"


class FakeAgent:
    """Claims every request on its direct subject and answers a head; the stream stays open
    unless ``ends``. Records the request ids it is told to cancel."""

    def __init__(self, nc: NATS, subjects: Subjects, agent_id: str, *, ends: bool = False) -> None:
        self.nc, self.subjects, self.id, self.ends = nc, subjects, agent_id, ends
        self.requests: list[str] = []
        self.cancelled: asyncio.Queue[str] = asyncio.Queue()

    async def start(self) -> None:
        await self.nc.subscribe(self.subjects.agent_work(self.id), cb=self._on_work)
        await self.nc.subscribe(self.subjects.agent_ctl(self.id), cb=self._on_ctl)

    async def _on_work(self, msg: Msg) -> None:
        rid = (msg.headers or {})[H.REQUEST]
        self.requests.append(rid)
        await self.nc.publish(msg.reply, b"", headers={H.KIND: H.CLAIM, H.AGENT: self.id, H.REQUEST: rid})
        head = {H.KIND: H.HEAD, H.STATUS: "200", H.CONTENT_TYPE: NDJSON}
        if self.ends:
            head[H.END] = "1"
        await self.nc.publish(msg.reply, b'{"from":"%s"}\n' % self.id.encode(), headers=head)

    async def _on_ctl(self, msg: Msg) -> None:
        if (msg.headers or {}).get(H.CTL) == H.CANCEL:
            self.cancelled.put_nowait((msg.headers or {})[H.REQUEST])


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.drain()


@pytest.fixture
async def transport(nc: NATS, root: str) -> AsyncIterator[Transport]:
    t = Transport(nc, Subjects(root), claim_timeout=2.0, idle_timeout=30.0)
    await t.start()
    yield t
    await t.stop()


async def agents(nc: NATS, root: str, *names: str, ends: bool = False) -> dict[str, FakeAgent]:
    out = {}
    for name in names:
        out[name] = FakeAgent(nc, Subjects(root), name, ends=ends)
        await out[name].start()
    assert await round_trip(nc, 10.0)
    return out


def work() -> WorkRequest:
    return WorkRequest("/api/show", b"{}")


async def test_leaving_a_reply_releases_its_call_and_cancels_the_open_stream(
    nc: NATS, root: str, transport: Transport
) -> None:
    (agent,) = (await agents(nc, root, "a1")).values()
    async with await transport.send_to("a1", work(), timeout=5) as reply:
        assert reply.agent == "a1" and not reply.ended
        assert transport.in_flight == 1 and dict(transport.outstanding) == {"a1": 1}
    assert transport.in_flight == 0 and dict(transport.outstanding) == {}
    assert await asyncio.wait_for(agent.cancelled.get(), 5) == agent.requests[0]


async def test_a_fan_out_with_one_failing_read_leaves_nothing_behind(
    nc: NATS, root: str, transport: Transport
) -> None:
    fleet = await agents(nc, root, "a1", "a2", "a3")
    reading: set[str] = set()
    all_open = asyncio.Event()

    async def read(reply: Reply) -> bytes:
        reading.add(reply.agent)
        if len(reading) == len(fleet):
            all_open.set()
        if reply.agent == "a2":
            await all_open.wait()  # every other reply is open and mid-read when this one fails
            raise RuntimeError("a read failed")
        return await reply.read()  # never ends on its own: these agents keep their streams open

    with pytest.raises(RuntimeError, match="a read failed"):
        await fan_out(list(fleet), lambda a: transport.send_to(a, work(), timeout=5), read)
    assert transport.in_flight == 0  # no call left registered
    assert dict(transport.outstanding) == {}  # every agent's count back to zero
    for agent in fleet.values():  # and every agent whose stream was open told to cancel
        assert await asyncio.wait_for(agent.cancelled.get(), 5) == agent.requests[0]


async def test_a_fan_out_tolerates_an_agent_that_does_not_answer(
    nc: NATS, root: str, transport: Transport
) -> None:
    await agents(nc, root, "a1", "a3", ends=True)  # "a2" has no subscription: no responders

    async def read(reply: Reply) -> bytes:
        return await reply.read()

    started = time.monotonic()
    results = await fan_out(["a1", "a2", "a3"], lambda a: transport.send_to(a, work(), timeout=5), read)
    assert time.monotonic() - started < 2.0  # no responders is answered at once, not by a timeout
    assert results[0] == b'{"from":"a1"}\n' and results[2] == b'{"from":"a3"}\n'
    assert isinstance(results[1], AgentUnavailable)
    assert transport.in_flight == 0 and dict(transport.outstanding) == {}


async def test_the_fleet_view_indexes_no_model_under_a_name_without_a_key(nc: NATS, root: str) -> None:
    """An agent reporting an unparseable model name: the name is routed nowhere (no holder under
    any key), while the agent's valid models are indexed as usual."""
    buckets = await ensure_buckets(nc.jetstream(), Subjects(root))
    names = ["llama3.2:latest", "not a model name!"]
    state = AgentState(
        id="a1",
        vendor="nvidia",
        host="h",
        ollama_url="http://h:11434",
        models=tuple(TagModel(name=n, model=n, modified_at="", size=1, digest="d") for n in names),
        updated_at=time.time(),
        heartbeat_s=60.0,
    )
    view = FleetView(buckets.agents)
    await view.start()
    try:
        await buckets.agents.put("a1", msgspec.json.encode(state))
        while view.get("a1") is None:
            assert await view.wait_changed(5)
        assert [a.id for a in view.with_model("llama3.2:latest")] == ["a1"]
        assert view.with_model("not a model name!") == []
    finally:
        await view.stop()


class Impostor:
    """Listens where it should not and answers first, claiming as ``claim_as``; then lets the honest
    agent (waiting on ``answered``) answer."""

    def __init__(self, nc: NATS, subject: str, claim_as: str) -> None:
        self.nc, self.subject, self.claim_as = nc, subject, claim_as
        self.answered = asyncio.Event()

    async def start(self) -> None:
        await self.nc.subscribe(self.subject, cb=self._on_work)

    async def _on_work(self, msg: Msg) -> None:
        rid = (msg.headers or {})[H.REQUEST]
        claim = {H.KIND: H.HEAD, H.STATUS: "200", H.CONTENT_TYPE: NDJSON, H.AGENT: self.claim_as, H.END: "1"}
        await self.nc.publish(msg.reply, b'{"from":"impostor"}\n', headers=claim | {H.REQUEST: rid})
        assert await round_trip(self.nc, 10.0)
        self.answered.set()


class Honest(FakeAgent):
    def __init__(
        self, nc: NATS, subjects: Subjects, agent_id: str, subject: str, after: asyncio.Event
    ) -> None:
        super().__init__(nc, subjects, agent_id, ends=True)
        self.subject, self.after = subject, after

    async def start(self) -> None:
        await self.nc.subscribe(self.subject, cb=self._on_work)

    async def _on_work(self, msg: Msg) -> None:
        await self.after.wait()  # the impostor's answer is on its way first
        await super()._on_work(msg)


async def _body(reply: Reply) -> bytes:
    async with reply:
        return await reply.read()


async def test_on_a_shared_subject_only_an_agent_of_the_fleet_is_believed(nc: NATS, root: str) -> None:
    subjects = Subjects(root)
    shared = subjects.work("any", "m")
    impostor = Impostor(nc, shared, "mallory")
    honest = Honest(nc, subjects, "a1", shared, impostor.answered)
    for listener in (impostor, honest):
        await listener.start()
    assert await round_trip(nc, 10.0)
    t = Transport(nc, subjects, claim_timeout=5.0, idle_timeout=30.0, members=lambda agent: agent == "a1")
    await t.start()
    try:
        reply = await t.attempt(work(), shared, None, time.monotonic() + 5)
        assert isinstance(reply, Reply) and reply.agent == "a1"
        assert await _body(reply) == b'{"from":"a1"}\n'
        assert len(honest.requests[0]) >= 17  # a counter and 64 random bits: not guessable
    finally:
        await t.stop()


async def test_a_direct_send_believes_only_the_agent_it_went_to(
    nc: NATS, root: str, transport: Transport
) -> None:
    subjects = Subjects(root)
    direct = subjects.agent_work("a1")
    impostor = Impostor(nc, direct, "a2")
    honest = Honest(nc, subjects, "a1", direct, impostor.answered)
    for listener in (impostor, honest):
        await listener.start()
    assert await round_trip(nc, 10.0)
    reply = await transport.send_to("a1", work(), timeout=5)
    assert reply.agent == "a1"
    assert await _body(reply) == b'{"from":"a1"}\n'


async def test_an_agent_that_leaves_the_fleet_ends_its_calls_at_once(nc: NATS, root: str) -> None:
    """Not at the idle timeout (30 s here): a stream under way ends with ``agent_unavailable``."""
    (agent,) = (await agents(nc, root, "a1")).values()
    t = Transport(nc, Subjects(root), claim_timeout=5.0, idle_timeout=30.0)
    await t.start()
    try:
        reply = await t.send_to("a1", work(), timeout=5)
        assert not reply.ended and t.agent_gone("a2") == 0
        assert t.agent_gone("a1") == 1
        with pytest.raises(AgentUnavailable, match="left the fleet"):
            async with asyncio.timeout(5):
                await reply.read()
        assert t.in_flight == 0
    finally:
        await t.stop()


async def test_a_claim_for_a_call_given_up_on_is_answered_with_a_cancel(
    nc: NATS, root: str, transport: Transport
) -> None:
    """A request routed again after it was taken and never claimed (an agent stalled between taking
    it off the fleet queue and claiming it) must not run twice: when the stalled agent's claim comes
    at last, its sender has released that call and tells the agent to drop the request."""
    (agent,) = (await agents(nc, root, "a1")).values()
    call, headers, _ = transport.register(work(), None, time.monotonic() + 30, queued=True)
    transport.release(call)  # given up on: routed again under a new call
    rid, reply = headers[H.REQUEST], headers[H.REPLY]
    await nc.publish(reply, b"", headers={H.KIND: H.CLAIM, H.AGENT: "a1", H.REQUEST: rid})
    assert await asyncio.wait_for(agent.cancelled.get(), 5) == rid


async def test_a_ping_for_a_request_the_sender_does_not_hold_is_answered_with_a_cancel(
    nc: NATS, root: str, transport: Transport
) -> None:
    """An agent pings every request it holds now and then. A ping naming a request its sender does
    not hold (a gateway restarted under the same id, a cancel lost in a NATS outage) is answered
    with a cancel; a ping for a request it holds is not."""
    (agent,) = (await agents(nc, root, "a1")).values()
    subjects = Subjects(root)
    held, headers, _ = transport.register(work(), "a1", time.monotonic() + 30)
    ping = {H.KIND: H.PING, H.AGENT: "a1"}
    await nc.publish(subjects.reply(transport.id, held.rid), b"", headers={**ping, H.REQUEST: held.rid})
    await nc.publish(subjects.reply(transport.id, "r0"), b"", headers={**ping, H.REQUEST: "r0"})
    # replies are handled in order: a cancel for the held request would have come first
    assert await asyncio.wait_for(agent.cancelled.get(), 5) == "r0"
    assert (await held.next(5)).headers == {**ping, H.REQUEST: held.rid}  # its call has the ping
    transport.release(held)


async def test_an_agent_is_not_blamed_for_a_claim_lost_to_the_senders_own_outage(root: str) -> None:
    """A direct request goes unclaimed: the sender notes that agent as unanswering (its planner
    skips it until its state is heard again), unless its own connection dropped meanwhile, which
    may have lost the claim: then the agent is not blamed."""
    subjects = Subjects(root)
    async with NatsServer(port=free_port()) as server:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        transport = Transport(nc, subjects, claim_timeout=1.0, members=lambda _: True)
        await transport.start()
        try:
            silent = await nc.subscribe(subjects.agent_work("silent"))  # takes work, never claims
            deadline = time.monotonic() + 30
            subject = subjects.agent_work("silent")
            outcome = await transport.attempt(work(), subject, "silent", deadline)
            assert outcome is Outcome.FAILED and "silent" in transport.unanswered  # its connection held
            await silent.next_msg(timeout=10)
            transport.unanswered.clear()

            attempt = asyncio.create_task(transport.attempt(work(), subject, "silent", deadline))
            await silent.next_msg(timeout=10)  # it has the request
            await server.kill()  # the sender's connection drops before the claim timeout
            await server.start()
            assert await attempt is Outcome.FAILED
            assert "silent" not in transport.unanswered
        finally:
            await transport.stop()
            await nc.close()


async def test_a_reply_gone_silent_across_the_senders_own_outage_blames_the_connection(root: str) -> None:
    """An agent's reply goes silent while the sender's own connection dropped and came back, or is
    still away (the rest of the reply, its end included, may have been lost with it): the error
    says so, rather than that the agent stopped responding. Without an outage, it is the agent's
    silence."""
    subjects = Subjects(root)
    async with NatsServer(port=free_port()) as server:
        back = asyncio.Event()

        async def reconnected() -> None:
            back.set()

        nc = await nats.connect(
            server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, reconnected_cb=reconnected
        )
        agent_nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        transport = Transport(nc, subjects, claim_timeout=5.0, idle_timeout=1.0)
        await transport.start()
        try:
            await FakeAgent(agent_nc, subjects, "a1").start()  # a head, then silence
            assert await round_trip(agent_nc, 5)
            deadline = time.monotonic() + 30

            quiet = await transport.attempt(work(), subjects.agent_work("a1"), "a1", deadline)
            assert isinstance(quiet, Reply)
            with pytest.raises(AgentUnavailable, match="agent a1 stopped responding"):
                async with quiet:
                    _ = [b async for b in quiet.batches()]

            cut = await transport.attempt(work(), subjects.agent_work("a1"), "a1", deadline)
            assert isinstance(cut, Reply)
            await server.kill()
            await server.start()
            await asyncio.wait_for(back.wait(), 30)
            with pytest.raises(AgentUnavailable, match="NATS connection was lost while agent a1 answered"):
                async with cut:
                    _ = [b async for b in cut.batches()]

            down = await transport.attempt(work(), subjects.agent_work("a1"), "a1", deadline)
            assert isinstance(down, Reply)
            back.clear()
            await server.kill()  # and still away when the silence has lasted the idle timeout
            with pytest.raises(AgentUnavailable, match="NATS connection was lost while agent a1 answered"):
                async with down:
                    _ = [b async for b in down.batches()]
            await server.start()
            await asyncio.wait_for(back.wait(), 30)  # back before it is closed
        finally:
            await transport.stop()
            await nc.close()
            await agent_nc.close()
