"""How long this gateway has been cut off from NATS, as its waiting requests see it.

A request that finds no slot waits for one, up to its queue deadline (`CORRAL_QUEUE_TIMEOUT_S`).
While the gateway's NATS connection is down nothing can reach an agent, and a NATS restart or a
cluster's failover is over in seconds: a request rides those out. An outage that lasts
`CORRAL_NATS_OUTAGE_S` ends every waiting request with a ``503`` that says what happened, instead
of the queue-is-full text at the end of a ten-minute deadline.

`Outage` is a pure state machine fed with the connection's state each time a request looks.
"""

from __future__ import annotations

from typing import Final

MESSAGE: Final = "fleet unreachable: this gateway has been disconnected from NATS for {:.0f} s"


class Outage:
    """Since when the connection has been seen down (None: up when last seen), shared by every
    request of one gateway; ``limit_s`` 0 never ends a request for it."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.since: float | None = None
        self._epoch = 0  # the connection's reconnect count when the outage was first seen

    def seen(self, connected: bool, now: float, epoch: int) -> str | None:
        """Record the connection's state at ``now`` (``epoch``: how many times it has come back so
        far); the error a waiting request ends with once it has been down for ``limit_s``, else
        None. The outage counts from the first look that saw it down: looks come at least every
        second from each waiting request, but none while nothing waits, so an outage seen with
        another reconnect count than the last one is a new outage."""
        if connected:
            self.since = None
            return None
        if self.since is None or epoch != self._epoch:
            self.since, self._epoch = now, epoch
        down = now - self.since
        if self.limit_s > 0 and down >= self.limit_s:
            return MESSAGE.format(down)
        return None

    def away_s(self, connected: bool, now: float, epoch: int) -> float | None:
        """Record the connection's state as `seen` does; how long it has been down (None: up)."""
        self.seen(connected, now, epoch)
        return None if self.since is None else now - self.since
