"""Every Corral connection (`corral.runtime.nats.connect`) survives a message whose reply subject is
not UTF-8: nats-py would otherwise end its read loop on it, leaving a connection that looks open and
reads nothing more — one raw publish from any client could silence a gateway or an agent."""

from __future__ import annotations

import nats
import pytest
from corral.runtime.nats import connect, round_trip
from corral.runtime.natsserver import NatsServer

from tests.integration.fleet_helpers import publish_raw

pytestmark = pytest.mark.integration


async def test_a_reply_subject_that_is_not_utf8_does_not_stop_the_connection(
    nats_server: NatsServer, root: str
) -> None:
    nc = await connect(nats_server.url, name="test")
    other = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe(f"{root}.>")
        assert await round_trip(nc, 10.0)
        await publish_raw(nats_server, f"{root}.hostile", b"x.\xff\xfe", b"boom")
        await other.publish(f"{root}.after", b"fine")
        assert await round_trip(other, 10.0)
        first = await sub.next_msg(timeout=5)
        assert first.subject == f"{root}.hostile" and "\ufffd" in first.reply
        second = await sub.next_msg(timeout=5)
        assert (second.subject, second.data) == (f"{root}.after", b"fine")
        assert nc.is_connected
    finally:
        await other.close()
        await nc.close()
