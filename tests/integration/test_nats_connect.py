"""Every Corral connection (`corral.runtime.nats.connect`) survives a message whose reply subject is
not UTF-8: nats-py would otherwise end its read loop on it, leaving a connection that looks open and
reads nothing more — one raw publish from any client could silence a gateway or an agent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import nats
import nats.aio.client
import pytest
from corral.runtime.nats import COMMAND_RECONNECTS, NatsUnreachable, connect, connect_command, round_trip
from corral.runtime.natsserver import NatsServer, free_port

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


async def test_a_server_that_refused_before_another_took_the_connection_is_no_cause_of_its_close(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first node of a cluster's URL list is down and the next one takes the connection: closing
    it later is no "closed for good" on the first node's refusal (what `corral status` printed with
    one node of three down, though it worked)."""
    monkeypatch.setattr(nats.aio.client, "shuffle", lambda pool: None)  # the list's order
    dead = f"nats://127.0.0.1:{free_port()}"
    nc = await connect(f"{dead},{nats_server.url}", name="test")
    assert nc.last_error is not None  # it was refused there first
    await nc.drain()
    assert not [r for r in caplog.records if "closed for good" in r.getMessage()]


async def test_a_commands_connection_gives_up_only_on_its_first_connect() -> None:
    """A command (`connect_command`) gives up on NATS that is not there, but once connected rides
    out a NATS restart as a service does, however many attempts it takes: a pull streaming for
    minutes outlives a blip."""
    with pytest.raises(NatsUnreachable):
        await connect_command(f"nats://127.0.0.1:{free_port()}", name="test")
    async with NatsServer(port=free_port()) as server:
        back, refusals = asyncio.Event(), asyncio.Queue[Exception]()
        nc = await connect_command(server.url, name="test")
        nc._reconnected_cb = _also(nc._reconnected_cb, back.set)  # told when it is back
        nc._error_cb = _also_error(nc._error_cb, refusals.put_nowait)  # and of each refused attempt
        try:
            await server.kill()
            async with asyncio.timeout(30):
                for _ in range(COMMAND_RECONNECTS + 2):  # more than a first connect may take
                    await refusals.get()
            await server.start()
            await asyncio.wait_for(back.wait(), 30)
            assert nc.is_connected and await round_trip(nc, 5)
        finally:
            await nc.close()


async def test_a_reconnect_that_reached_no_nats_server_closes_its_socket() -> None:
    """While NATS is away something else answers on its port (a proxy or load balancer with nothing
    behind it, a program that took the port): every reconnect attempt there fails its handshake.
    Each attempt's socket is closed when it fails, not left open for the garbage collector, and
    the connection comes back once NATS does."""
    async with NatsServer(port=free_port()) as server:
        back, closed = asyncio.Event(), asyncio.Queue[None]()
        nc = await connect(server.url, name="test")
        nc._reconnected_cb = _also(nc._reconnected_cb, back.set)

        async def not_nats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # no INFO: the handshake fails
            await writer.drain()
            await reader.read()  # until the client closes its end
            closed.put_nowait(None)
            writer.close()

        try:
            await server.kill()
            impostor = await asyncio.start_server(not_nats, server.host, server.port)
            try:
                async with asyncio.timeout(30):
                    for _ in range(3):
                        await closed.get()
            finally:
                impostor.close()
                await impostor.wait_closed()
            await server.start()
            await asyncio.wait_for(back.wait(), 30)
            assert nc.is_connected and await round_trip(nc, 5)
        finally:
            await nc.close()


def _also(
    cb: Callable[[], Awaitable[None]] | None, then: Callable[[], None]
) -> Callable[[], Awaitable[None]]:
    async def both() -> None:
        if cb is not None:
            await cb()
        then()

    return both


def _also_error(
    cb: Callable[[Exception], Awaitable[None]], then: Callable[[Exception], None]
) -> Callable[[Exception], Awaitable[None]]:
    async def both(e: Exception) -> None:
        await cb(e)
        then(e)

    return both
