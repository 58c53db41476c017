"""A streamed answer that lost reply messages on the way (a NATS node dying under it) ends with an
error line, never with Ollama's last line (``"done":true``) after a gap: a client that stops
reading at "done" would take the gapped text for the whole answer."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest
from corral.gateway.errors import Dialect
from corral.gateway.relay import stream_reply
from corral.protocol import headers as H
from corral.protocol.subjects import Subjects
from corral.runtime.nats import round_trip
from corral.runtime.natsserver import NatsServer
from corral.transport import Reply, Transport, WorkRequest
from nats.aio.msg import Msg

from tests.integration.fleet_helpers import AsgiSink

pytestmark = pytest.mark.integration

AGENT = "a1"
NDJSON = "application/x-ndjson"
LINES = [b'{"response":"one","done":false}\n', b'{"response":"two","done":false}\n']
LAST = b'{"response":"","done":true,"eval_count":3}\n'


SSE = "text/event-stream"
SSE_LINES = [b'data: {"choices":[{"delta":{"content":"data: [DONE]"}}]}\n\n']
SSE_LAST = b"data: [DONE]\n\n"


async def _relayed(
    nats_server: NatsServer,
    root: str,
    *,
    lost: int,
    lines: list[bytes] = LINES,
    last: bytes = LAST,
    content_type: str = NDJSON,
    api: Dialect = "ollama",
) -> list[bytes]:
    """The body lines a client gets for an answer whose agent sent every line but ``lost`` of
    them were lost on the way (its end still counts what it sent)."""
    subjects = Subjects(root)
    gw = await nats.connect(nats_server.url)
    agent = await nats.connect(nats_server.url)

    async def on_work(msg: Msg) -> None:
        assert msg.reply
        await agent.publish(msg.reply, b"", headers={H.KIND: H.CLAIM, H.AGENT: AGENT})
        head = {H.KIND: H.HEAD, H.STATUS: "200", H.CONTENT_TYPE: content_type}
        await agent.publish(msg.reply, b"", headers=head)
        for line in lines[lost:]:
            await agent.publish(msg.reply, line)
        await agent.publish(msg.reply, last)
        await agent.publish(msg.reply, b"", headers={H.KIND: H.END_KIND, H.SEQ: str(len(lines) + 1)})

    await agent.subscribe(subjects.agent_work(AGENT), cb=on_work)
    assert await round_trip(agent, 10.0)
    transport = Transport(gw, subjects)
    await transport.start()
    sink = AsgiSink()
    try:
        reply = await transport.send_to(AGENT, WorkRequest(endpoint="/api/generate", body=b"{}"), timeout=5)
        assert isinstance(reply, Reply)
        async with asyncio.timeout(10), reply:
            await stream_reply(reply, sink, api=api)
    finally:
        await transport.stop()
        await gw.close()
        await agent.close()
    return [line for line in sink.body.split(b"\n") if line.strip()]


async def test_a_whole_answer_ends_with_its_done_line(nats_server: NatsServer, root: str) -> None:
    lines = await _relayed(nats_server, root, lost=0)
    assert [msgspec.json.decode(line).get("done") for line in lines] == [False, False, True]


async def test_an_answer_that_lost_a_message_ends_with_an_error_not_done(
    nats_server: NatsServer, root: str
) -> None:
    lines = await _relayed(nats_server, root, lost=1)
    decoded = [msgspec.json.decode(line) for line in lines]
    assert not any(d.get("done") for d in decoded)
    assert "lost 1 of 3 reply messages" in decoded[-1]["error"]


async def test_an_openai_stream_that_lost_a_message_ends_with_an_error_not_done(
    nats_server: NatsServer, root: str
) -> None:
    whole = await _relayed(nats_server, root, lost=0, lines=SSE_LINES, last=SSE_LAST, content_type=SSE)
    assert whole[-1] == b"data: [DONE]" and len(whole) == 2  # the text saying "data: [DONE]" too
    gapped = await _relayed(nats_server, root, lost=1, lines=SSE_LINES, last=SSE_LAST, content_type=SSE)
    assert b"data: [DONE]" not in gapped and b"lost 1 of 2 reply messages" in gapped[-1]


ANTHROPIC_LINES = [
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"event: message_stop"}}\n\n'
]
ANTHROPIC_LAST = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


async def test_an_anthropic_stream_that_lost_a_message_ends_with_its_error_event(
    nats_server: NatsServer, root: str
) -> None:
    """/v1/messages: its last event (``message_stop``) is held as ``[DONE]`` is; a gapped stream
    ends with Anthropic's ``error`` event instead."""
    sse = {"last": ANTHROPIC_LAST, "content_type": SSE, "api": "anthropic"}
    whole = await _relayed(nats_server, root, lost=0, lines=ANTHROPIC_LINES, **sse)  # type: ignore[arg-type]
    assert whole[-2:] == [b"event: message_stop", b'data: {"type":"message_stop"}']
    gapped = await _relayed(nats_server, root, lost=1, lines=ANTHROPIC_LINES, **sse)  # type: ignore[arg-type]
    assert gapped[-2] == b"event: error" and b"event: message_stop" not in gapped
    error = msgspec.json.decode(gapped[-1].removeprefix(b"data: "))
    assert error["type"] == "error" and "lost 1 of 2 reply messages" in error["error"]["message"]
