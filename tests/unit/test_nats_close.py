"""A connection that nats-py closes while the server resets the socket still tells its service."""

from __future__ import annotations

import pytest
from corral.runtime.nats import _close_reliably
from nats.aio.client import Client as NATS


def _client_whose_close_fails() -> NATS:
    """A client whose nats-py ``_close`` fails as it does on a reset socket: it marks the client
    closed, then the final flush raises before the closed callback runs."""
    nc = NATS()

    async def failing(status: int, do_cbs: bool = True) -> None:
        nc._status = NATS.CLOSED
        raise ConnectionResetError("Connection lost")

    nc._close = failing  # type: ignore[method-assign]
    return nc


async def test_the_service_is_told_when_the_final_flush_fails() -> None:
    nc, told = _client_whose_close_fails(), []

    async def on_close() -> None:
        told.append(True)

    _close_reliably(nc, on_close)
    await nc._close(NATS.CLOSED)  # as nats-py's read loop schedules it on an authorization violation
    assert told == [True]
    assert nc.is_closed


async def test_a_close_without_callbacks_still_raises() -> None:
    nc, told = _client_whose_close_fails(), []

    async def on_close() -> None:
        told.append(True)

    _close_reliably(nc, on_close)
    with pytest.raises(ConnectionResetError):
        await nc._close(NATS.CLOSED, do_cbs=False)
    assert told == []
