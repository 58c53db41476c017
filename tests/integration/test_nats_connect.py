"""Every Corral connection (`corral.runtime.nats.connect`) survives a message whose reply subject is
not UTF-8: nats-py would otherwise end its read loop on it, leaving a connection that looks open and
reads nothing more — one raw publish from any client could silence a gateway or an agent."""

from __future__ import annotations

import asyncio

import nats
import pytest
from corral.runtime.nats import connect
from corral.runtime.natsserver import NatsServer

pytestmark = pytest.mark.integration


async def _publish_raw(server: NatsServer, subject: str, reply: bytes, payload: bytes) -> None:
    """Publish over the bare protocol, which (unlike nats-py) can send any bytes as a reply subject."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n')
        writer.write(b"PUB %s %s %d\r\n%s\r\nPING\r\n" % (subject.encode(), reply, len(payload), payload))
        async with asyncio.timeout(5):
            assert await reader.readline() == b"PONG\r\n"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_reply_subject_that_is_not_utf8_does_not_stop_the_connection(
    nats_server: NatsServer, root: str
) -> None:
    nc = await connect(nats_server.url, name="test")
    other = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe(f"{root}.>")
        await nc.flush()
        await _publish_raw(nats_server, f"{root}.hostile", b"x.\xff\xfe", b"boom")
        await other.publish(f"{root}.after", b"fine")
        await other.flush()
        first = await sub.next_msg(timeout=5)
        assert first.subject == f"{root}.hostile" and "\ufffd" in first.reply
        second = await sub.next_msg(timeout=5)
        assert (second.subject, second.data) == (f"{root}.after", b"fine")
        assert nc.is_connected
    finally:
        await other.close()
        await nc.close()
