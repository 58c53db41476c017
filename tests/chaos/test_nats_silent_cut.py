"""A link cut without a word (a cable pulled, a host's network gone): no FIN, no RST, nothing
arrives and nothing says why. Between a client and a real nats-server sits a TCP relay that, when
told, stops passing bytes either way while keeping both sockets open. The client's own pings
notice: its connection is taken for lost within a few ping intervals, not nats-py's minutes."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from corral.runtime.nats import PING_INTERVAL_S, PINGS_OUTSTANDING, connect
from corral.runtime.natsserver import NatsServer

pytestmark = pytest.mark.chaos

# the bound of the wait: the pings that must go unanswered, and as much again for slack
NOTICED_WITHIN_S = 2 * (PINGS_OUTSTANDING + 2) * PING_INTERVAL_S


class SilentRelay:
    """Relays one port to another until `cut`, then swallows every byte, both ways, in silence."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_off = asyncio.Event()
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> SilentRelay:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            self._tasks.add(asyncio.create_task(self._pipe(src, dst)))

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                if not self.cut_off.is_set():
                    dst.write(data)
                    await dst.drain()


async def test_a_silently_cut_link_is_noticed_by_the_clients_pings(nats_server: NatsServer) -> None:
    async with SilentRelay(nats_server.port) as relay:
        lost = asyncio.Event()
        nc = await connect(relay.url, name="cut-test")
        nc._disconnected_cb_orig = nc._disconnected_cb  # type: ignore[attr-defined]

        async def disconnected() -> None:
            lost.set()
            await nc._disconnected_cb_orig()  # type: ignore[attr-defined]

        nc._disconnected_cb = disconnected
        try:
            assert nc.is_connected
            relay.cut_off.set()
            await asyncio.wait_for(lost.wait(), NOTICED_WITHIN_S)
            assert not nc.is_connected
        finally:
            await nc.close()
