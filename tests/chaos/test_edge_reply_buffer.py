"""A client that stops reading cannot make the gateway hold its whole reply: past the per-request
bound the work is cancelled at the agent and the client's stream ends with an error line."""

from __future__ import annotations

import asyncio

import nats
import pytest
from corral.gateway.relay import stream_reply
from corral.protocol import headers as H
from corral.protocol.subjects import Subjects
from corral.runtime.nats import round_trip
from corral.runtime.natsserver import NatsServer
from corral.transport import Reply, Transport, WorkRequest
from nats.aio.msg import Msg

from tests.integration.fleet_helpers import AsgiSink

pytestmark = pytest.mark.chaos

BOUND = 8 * 1024
AGENT = "a1"


async def test_an_unread_reply_past_its_bound_is_cancelled_at_the_agent(
    nats_server: NatsServer, root: str
) -> None:
    subjects = Subjects(root)
    gw = await nats.connect(nats_server.url)
    agent = await nats.connect(nats_server.url)
    cancelled: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    reply_to: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_work(msg: Msg) -> None:
        assert msg.reply
        await agent.publish(msg.reply, b"", headers={H.KIND: H.CLAIM, H.AGENT: AGENT})
        await agent.publish(msg.reply, b"", headers={H.KIND: H.HEAD, H.STATUS: "200"})
        reply_to.set_result(msg.reply)

    async def on_ctl(msg: Msg) -> None:
        if not cancelled.done():
            cancelled.set_result(dict(msg.headers or {}))

    await agent.subscribe(subjects.agent_work(AGENT), cb=on_work)
    await agent.subscribe(subjects.agent_ctl(AGENT), cb=on_ctl)
    assert await round_trip(agent, 10.0)
    transport = Transport(gw, subjects, reply_buffer=BOUND)
    await transport.start()
    try:
        reply = await transport.send_to(AGENT, WorkRequest(endpoint="/api/generate", body=b"{}"), timeout=5)
        assert isinstance(reply, Reply)
        for _ in range(64):  # a fast agent: far more than the bound, and nobody reading it
            await agent.publish(await reply_to, b'{"response":"' + b"x" * 1000 + b'"}\n')
        ctl = await asyncio.wait_for(cancelled, 10)  # nobody has read a byte: the bound cancels it
        assert ctl[H.CTL] == H.CANCEL
        sink = AsgiSink()
        await stream_reply(reply, sink, api="ollama")
    finally:
        await transport.stop()
        await gw.close()
        await agent.close()
    body = sink.body
    last = body.strip().split(b"\n")[-1]
    assert last.startswith(b'{"error":"reply cancelled')
    assert len(body) < 2 * BOUND  # what was held is at most the bound, never the whole reply
    assert transport.in_flight == 0
