"""An agent's last step (`corral.agent.lifecycle.leave`) ends with its connection closed, whatever
NATS does meanwhile: a drain that fails because NATS went away must not leave nats-py reconnecting
for good (the process then never exited after SIGTERM)."""

from __future__ import annotations

import nats.errors
from corral.agent.lifecycle import leave


class _Connection:
    """What `leave` reads of a nats-py client: its state, drain and close."""

    def __init__(self, *, drain_fails: bool) -> None:
        self.is_closed = False
        self.is_connected = True
        self.drain_fails = drain_fails
        self.calls: list[str] = []

    async def drain(self) -> None:
        self.calls.append("drain")
        if self.drain_fails:
            raise nats.errors.ConnectionReconnectingError
        self.is_closed = True

    async def close(self) -> None:
        self.calls.append("close")
        self.is_closed = True


async def test_a_drain_that_fails_as_nats_goes_away_closes_the_connection() -> None:
    nc = _Connection(drain_fails=True)
    await leave(nc, None, "a1")  # type: ignore[arg-type]
    assert nc.calls == ["drain", "close"] and nc.is_closed


async def test_a_drain_that_works_is_all() -> None:
    nc = _Connection(drain_fails=False)
    await leave(nc, None, "a1")  # type: ignore[arg-type]
    assert nc.calls == ["drain"]
