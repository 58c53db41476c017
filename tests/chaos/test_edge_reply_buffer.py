"""A client that stops reading cannot make the gateway hold its whole reply. An agent that keeps to
the request's window (``Corral-Window``) waits for the reader, so nothing piles up and the reply
arrives whole once read; one that does not (an older agent, another sender) is cancelled past the
per-request bound, and the client's stream ends with an error line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import nats
import pytest
from corral.gateway.relay import stream_reply
from corral.protocol import headers as H
from corral.protocol.envelope import decode_request
from corral.protocol.errors import ReplyOverflow
from corral.protocol.subjects import Subjects
from corral.runtime.nats import round_trip
from corral.runtime.natsserver import NatsServer
from corral.transport import Reply, Transport, WorkRequest, replies
from corral.transport.replies import ReplyWriter
from corral.transport.reply import Call
from corral.up import FleetOptions, LocalFleet, default_sims
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from tests.integration.fleet_helpers import AsgiSink

pytestmark = pytest.mark.chaos

BOUND = 8 * 1024
AGENT = "a1"
CHUNK = b'{"response":"' + b"x" * 1000 + b'"}\n'
CHUNKS = 64


@asynccontextmanager
async def _requester_and_agent(url: str, subjects: Subjects) -> AsyncIterator[tuple[Transport, NATS]]:
    """A requester's `Transport` (reply bound `BOUND`, started) and an agent's NATS connection, on
    connections of their own; both closed on the way out."""
    gw, agent = await nats.connect(url), await nats.connect(url)
    transport = Transport(gw, subjects, reply_buffer=BOUND)
    try:
        await transport.start()
        yield transport, agent
    finally:
        await transport.stop()
        await gw.close()
        await agent.close()


async def test_an_unread_reply_past_its_bound_is_cancelled_at_the_agent(
    nats_server: NatsServer, root: str
) -> None:
    cancelled: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    reply_to: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    async with _requester_and_agent(nats_server.url, Subjects(root)) as (transport, agent):

        async def on_work(msg: Msg) -> None:
            assert msg.reply
            await agent.publish(msg.reply, b"", headers={H.KIND: H.CLAIM, H.AGENT: AGENT})
            await agent.publish(msg.reply, b"", headers={H.KIND: H.HEAD, H.STATUS: "200"})
            reply_to.set_result(msg.reply)

        async def on_ctl(msg: Msg) -> None:
            if not cancelled.done():
                cancelled.set_result(dict(msg.headers or {}))

        await agent.subscribe(transport.subjects.agent_work(AGENT), cb=on_work)
        await agent.subscribe(transport.subjects.agent_ctl(AGENT), cb=on_ctl)
        assert await round_trip(agent, 10.0)
        reply = await transport.send_to(AGENT, WorkRequest(endpoint="/api/generate", body=b"{}"), timeout=5)
        assert isinstance(reply, Reply)
        for _ in range(64):  # a fast agent: far more than the bound, and nobody reading it
            await agent.publish(await reply_to, CHUNK)
        ctl = await asyncio.wait_for(cancelled, 10)  # nobody has read a byte: the bound cancels it
        assert ctl[H.CTL] == H.CANCEL
        sink = AsgiSink()
        await stream_reply(reply, sink, api="ollama")
    body = sink.body
    last = body.strip().split(b"\n")[-1]
    assert last.startswith(b'{"error":"reply cancelled')
    assert len(body) < 2 * BOUND  # what was held is at most the bound, never the whole reply
    assert transport.in_flight == 0


class _Writer(ReplyWriter):
    """An agent's reply writer that says when it first waits for its reader."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waited = asyncio.Event()
        self.most_ahead = 0  # the most bytes it had sent and its reader not yet taken

    async def _room(self) -> None:
        self.waited.set()
        await super()._room()

    async def data(self, body: bytes) -> None:
        await super().data(body)
        self.most_ahead = max(self.most_ahead, self._sent - self._read)


async def _windowed_agent(agent: NATS, subjects: Subjects) -> list[_Writer]:
    """A stand-in agent that keeps to each request's window: it answers `CHUNKS` lines of `CHUNK`
    through a `_Writer` (listed, in the order the requests came) and hears its read controls."""
    writers: list[_Writer] = []

    async def answer(out: _Writer) -> None:
        await out.head(200, "application/x-ndjson", CHUNK)
        for _ in range(CHUNKS - 1):
            await out.data(CHUNK)
        await out.end()

    async def on_work(msg: Msg) -> None:
        assert msg.reply
        env = decode_request(msg.headers)
        out = _Writer(agent, msg.reply, env.rid, AGENT, window=env.window)
        writers.append(out)
        asyncio.ensure_future(answer(out))

    async def on_ctl(msg: Msg) -> None:
        h = msg.headers or {}
        assert h[H.CTL] == H.READ_CTL, h  # never a cancel: nothing overflows
        writers[0].took(h[H.READ])

    await agent.subscribe(subjects.agent_work(AGENT), cb=on_work)
    await agent.subscribe(subjects.agent_ctl(AGENT), cb=on_ctl)
    assert await round_trip(agent, 10.0)
    return writers


async def test_an_agent_keeps_a_windowed_reply_to_what_its_reader_takes(
    nats_server: NatsServer, root: str
) -> None:
    """The same unread reply from an agent that keeps to the request's window: it waits for its
    reader instead of sending on, so nothing overflows, and once read the whole reply arrives."""
    async with _requester_and_agent(nats_server.url, Subjects(root)) as (transport, agent):
        writers = await _windowed_agent(agent, transport.subjects)
        reply = await transport.send_to(AGENT, WorkRequest(endpoint="/api/generate", body=b"{}"), timeout=5)
        assert isinstance(reply, Reply)
        (out,) = writers
        await asyncio.wait_for(out.waited.wait(), 10)  # nobody has read a byte: it waits
        window = transport.reply_window
        assert window == BOUND // 2 and out.most_ahead <= window + len(CHUNK)
        sink = AsgiSink()
        await stream_reply(reply, sink, api="ollama")
    assert sink.body == CHUNK * CHUNKS  # all of it, in order, and no error line
    assert out.most_ahead <= window + len(CHUNK)
    assert transport.in_flight == 0


async def test_a_large_answer_to_a_client_that_does_not_read_waits_at_the_agent(
    nats_server: NatsServer, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the gateway, with a simulated Ollama: an embedding answer many times the gateway's
    reply bound, to a client that reads nothing until the agent has had to wait for it. Without
    the window the gateway would cut it at the bound; with it, the client gets all of it."""
    waited = asyncio.Event()
    room = ReplyWriter._room

    async def noted(self: ReplyWriter) -> None:
        waited.set()
        await room(self)

    monkeypatch.setattr(ReplyWriter, "_room", noted)
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=0.0),
        gateway={"reply_buffer_bytes": 256 * 1024},
    )
    inputs = [f"text {i}" for i in range(4000)]  # some 30 MB of JSON: more than the sockets hold
    async with LocalFleet(options) as fleet, aiohttp.ClientSession() as http:
        async with http.post(f"{fleet.url}/api/embed", json={"model": "all-minilm", "input": inputs}) as r:
            assert r.status == 200
            await asyncio.wait_for(waited.wait(), 30)  # the agent holds it back for the client
            body = await r.read()
    answer = json.loads(body)  # whole: no error line after it
    assert len(answer["embeddings"]) == len(inputs) and len(body) > 80 * 256 * 1024


class _Sink(AsgiSink):
    """An ASGI ``send`` that says when it was written to."""

    def __init__(self) -> None:
        super().__init__()
        self.wrote = asyncio.Event()

    async def __call__(self, event: dict[str, object]) -> None:
        await super().__call__(event)
        self.wrote.set()


async def test_a_lost_read_control_is_said_again_at_the_agents_ping(
    nats_server: NatsServer, root: str
) -> None:
    """NATS keeps no message for later: every read control is lost until the reader has taken all
    the agent sent and the agent waits; then nothing more would come from either side, but the
    agent's next ping (it pings whatever it holds while silent) has the reader say its count again,
    and the reply goes on to its end."""
    heard = asyncio.Event()  # read controls reach the agent from now on
    async with _requester_and_agent(nats_server.url, Subjects(root)) as (transport, agent):
        writers = await _windowed_agent(agent, transport.subjects)
        told = transport.took

        async def lost_until_heard(call: Call, taken: int) -> None:
            if heard.is_set():
                await told(call, taken)

        transport.took = lost_until_heard  # type: ignore[method-assign]
        reply = await transport.send_to(AGENT, WorkRequest(endpoint="/api/generate", body=b"{}"), timeout=5)
        assert isinstance(reply, Reply)
        sink = _Sink()
        reading = asyncio.ensure_future(stream_reply(reply, sink, api="ollama"))
        (out,) = writers
        await asyncio.wait_for(out.waited.wait(), 10)
        async with asyncio.timeout(10):  # the reader has taken all that was sent, and said so in vain
            while len(sink.body) < out._sent:
                sink.wrote.clear()
                await sink.wrote.wait()
        heard.set()
        await out.ping()  # what its agent's ping loop sends while it is silent
        await asyncio.wait_for(reading, 10)
    assert sink.body == CHUNK * CHUNKS


async def test_a_reply_its_requester_takes_none_of_ends(
    monkeypatch: pytest.MonkeyPatch, nats_server: NatsServer
) -> None:
    """A client that stops reading would hold the agent's slot and runner for as long as its socket
    lives: a writer whose window stays full for `HOLD_S` ends the reply (here a short one)."""
    monkeypatch.setattr(replies, "HOLD_S", 0.05)
    nc = await nats.connect(nats_server.url)
    try:
        out = ReplyWriter(nc, "unread.reply", "r1", AGENT, window=4096)
        await out.head(200, "application/x-ndjson", b"x" * 4096)
        with pytest.raises(ReplyOverflow, match="its requester took none of it for 0 s"):
            async with asyncio.timeout(10):  # the bound of this test, not the writer's
                await out.data(b"y" * 100)
        assert not out.held
    finally:
        await nc.close()
