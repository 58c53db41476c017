"""Single-shot queue subscriptions that lose no delivery.

A claim subscription should fire once: the server retires it after one delivery (``UNSUB <sid> 1``)
so nothing needs to take interest back. The server applies that limit when it reads the UNSUB, a
moment after the SUB; a request published in between can be delivered too, so a subscription may
fire twice. nats-py's own ``unsubscribe(limit=1)`` also counts deliveries on the client and drops
every one past the first, so that second request would wait out its sender's claim timeout.

`SingleShots` sends the server the limit but keeps listening: every delivery reaches the callback
(which answers one it cannot serve at once, so the sender moves on). After the first delivery the
subscription is retired: an unsubscribe and a round trip to the server, after which nothing more
can be on its way, then the deliveries already here are handed to the callback and it is dropped.
Subscriptions due while a round trip is out share the next one. Taking interest back (`retire`)
works the same way, so no delivery is lost to it either.

A reconnect subscribes again without the limit (nats-py replays its subscriptions, and counts
nothing here); `relimit` sends it again for every subscription armed and not yet retired. Until it
does, a delivery past the first also goes to the callback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from corral.runtime.nats import round_trip
from corral.runtime.tasks import cancel_and_wait
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

log = logging.getLogger(__name__)

ROUND_TRIP_S = 5.0  # how long retiring waits for the server, and then for the callbacks

Handler = Callable[[Msg], Awaitable[None]]


class SingleShots:
    """Arms and retires single-shot queue subscriptions on one connection."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._due: list[Subscription] = []  # to retire, gathered while a round trip is out
        self._batch: list[Subscription] = []  # being retired
        self._task: asyncio.Task[None] | None = None  # the retiring, while there is any
        self._armed: dict[int, Subscription] = {}  # armed and not yet due to retire, by sid
        self._reconnects = nc.stats["reconnects"]  # as of the last `relimit`

    async def arm(self, subject: str, queue: str, cb: Handler) -> Subscription:
        """Subscribe to ``subject`` in ``queue`` for one delivery; call `retire` once it came."""
        sub = await self._nc.subscribe(subject, queue=queue, cb=cb)
        # The limit goes to the server only: nats-py's client-side count would drop a second
        # delivery that the server sent before it read the limit.
        await self._nc._send_unsubscribe(sub._id, limit=1)
        self._armed[sub._id] = sub
        return sub

    async def relimit(self) -> None:
        """After a reconnect (nats-py subscribed again without the limit), send the limit again
        for every armed subscription; nothing when there was no reconnect since the last call."""
        reconnects = self._nc.stats["reconnects"]
        if reconnects == self._reconnects:
            return
        self._reconnects = reconnects
        for sid in list(self._armed):
            await self._nc._send_unsubscribe(sid, limit=1)  # one delivered already: gone at once

    def retire(self, sub: Subscription) -> None:
        """Take ``sub`` out of service in the background; what was already sent to it is still
        handed to its callback."""
        self._armed.pop(sub._id, None)
        self._due.append(sub)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._retire(), name="retire")

    @property
    def retiring(self) -> int:
        """Subscriptions still being retired."""
        return len(self._due) + len(self._batch)

    async def _retire(self) -> None:
        """Retire what is due, a batch per round trip: every subscription retired in one needs
        only the one (the server reads a connection's commands in order)."""
        try:
            while self._due:
                batch = self._batch = self._due
                self._due = []
                try:
                    if not self._nc.is_connected:
                        raise NatsError("not connected")  # nothing is delivered meanwhile
                    for sub in batch:
                        await self._nc._send_unsubscribe(sub._id)  # spent ones: gone already
                    if not await round_trip(self._nc, ROUND_TRIP_S):
                        raise NatsError("no answer from the server")
                    # the server has read them, so nothing more is on its way
                    async with asyncio.timeout(ROUND_TRIP_S):
                        for sub in batch:
                            await sub._pending_queue.join()  # what came was handed to the callback
                except (NatsError, TimeoutError) as e:  # closed, or no answer in time
                    log.debug("retiring %d single-shot subscriptions: %s", len(batch), e)
                for sub in batch:
                    await _forget(sub)
        finally:
            self._task, self._batch = None, []

    async def settled(self) -> None:
        """Wait for the retirements under way (on drain, before the connection closes)."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop retiring (the connection is going away)."""
        if self._task is not None:
            await cancel_and_wait([self._task])
        self._due.clear()
        self._armed.clear()


async def _forget(sub: Subscription) -> None:
    """Drop ``sub`` here (the server has, or the connection is gone)."""
    try:
        await sub.unsubscribe()
    except NatsError:
        pass  # closed already, or with its connection
