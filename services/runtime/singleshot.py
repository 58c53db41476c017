"""Single-shot queue subscriptions that lose no delivery.

A claim subscription should fire once: the server retires it after one delivery (``UNSUB <sid> 1``)
so nothing needs to take interest back. The server applies that limit when it reads the UNSUB, a
moment after the SUB; a request published in between can be delivered too, so a subscription may
fire twice. nats-py's own ``unsubscribe(limit=1)`` also counts deliveries on the client and drops
every one past the first, so that second request would wait out its sender's claim timeout.

`SingleShots` sends the server the limit but keeps listening: every delivery reaches the callback
(which answers one it cannot serve at once, so the sender moves on). After the first delivery the
subscription is retired (`spent`): after a round trip to the server nothing more can be on its way,
and once the deliveries already here have been handed to the callback it is dropped. Taking
interest back (`retire`) sends an unsubscribe at once and then works the same way, so no delivery
is lost to it either. Retirements share round trips (`GATHER_S`, `GATHER_MAX`).

A reconnect subscribes again without the limit (nats-py replays its subscriptions, and counts
nothing here); `relimit` sends it again for every subscription armed and not yet retired. Until it
does, a delivery past the first also goes to the callback.
"""

from __future__ import annotations

import asyncio
import contextlib
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
# Retirements due within GATHER_S of the first, up to GATHER_MAX, share one round trip. The server
# has stopped delivering to them already; they only linger here, idle, until it.
GATHER_S = 5.0
GATHER_MAX = 256

Handler = Callable[[Msg], Awaitable[None]]


class SingleShots:
    """Arms and retires single-shot queue subscriptions on one connection."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        # armed and not yet due to retire, by sid: with the connection's reconnect count when
        # the server was last sent its limit (a reconnect since means it was replayed without)
        self._armed: dict[int, tuple[Subscription, int]] = {}
        # to drop here after the next round trip, with the reconnect count when each became due
        self._due: list[tuple[Subscription, int]] = []
        self._batch: list[tuple[Subscription, int]] = []  # being dropped
        self._task: asyncio.Task[None] | None = None  # the retiring, while there is any
        self._now = asyncio.Event()  # retire what is due without gathering more
        self._settling = 0  # callers of `settled`: while any wait, nothing is gathered
        self._relimited = self._reconnects()  # the reconnect count `relimit` last went through
        # UNSUBs sent to take interest back before a round trip (none for a subscription its limit
        # ended); dropping one here afterwards (nats-py's unsubscribe) sends one more, needless one
        self.unsubscribed = 0

    def _reconnects(self) -> int:
        return int(self._nc.stats["reconnects"])

    async def arm(self, subject: str, queue: str, cb: Handler) -> Subscription:
        """Subscribe to ``subject`` in ``queue`` for one delivery; call `spent` once it came."""
        sub = await self._nc.subscribe(subject, queue=queue, cb=cb)
        # The limit goes to the server only: nats-py's client-side count would drop a second
        # delivery that the server sent before it read the limit.
        await self._nc._send_unsubscribe(sub._id, limit=1)
        self._armed[sub._id] = sub, self._reconnects()
        return sub

    async def relimit(self) -> None:
        """After a reconnect (nats-py subscribed again without the limit), send the limit again
        for every armed subscription."""
        now = self._reconnects()
        if now == self._relimited:
            return  # no reconnect since the last pass: each one armed since has its limit (the common case)
        for sid, (sub, limited) in list(self._armed.items()):
            if limited != now:
                await self._nc._send_unsubscribe(sid, limit=1)  # one delivered already: gone at once
                if sid in self._armed:  # not spent meanwhile
                    self._armed[sid] = sub, now
        self._relimited = now

    async def spent(self, sub: Subscription) -> None:
        """``sub`` delivered: retire it. The server has (its limit), unless a reconnect replayed
        it without one."""
        armed = self._armed.pop(sub._id, None)
        if armed is None or armed[1] != self._reconnects():
            await self._unsubscribe(sub)
        self._due_now(sub)

    async def retire(self, sub: Subscription) -> None:
        """Take interest in ``sub`` back now; what was already sent to it is still handed to its
        callback."""
        self._armed.pop(sub._id, None)
        await self._unsubscribe(sub)
        self._due_now(sub)

    async def _unsubscribe(self, sub: Subscription) -> None:
        """Tell the server (while reconnecting, nats-py writes it after its replay); this side
        keeps listening until the round trip (`_retire`)."""
        if not self._nc.is_closed:
            await self._nc._send_unsubscribe(sub._id)
            self.unsubscribed += 1

    def _due_now(self, sub: Subscription) -> None:
        self._due.append((sub, self._reconnects()))
        if len(self._due) >= GATHER_MAX:
            self._now.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._retire(), name="retire")

    @property
    def retiring(self) -> int:
        """Subscriptions still being retired."""
        return len(self._due) + len(self._batch)

    async def _retire(self) -> None:
        """Drop what is due here, a batch per round trip: the server has read every unsubscribe
        (or used up every limit) sent before it, so nothing more is on its way to them. One that
        a reconnect replayed (without any limit) since it became due is unsubscribed first, and a
        reconnect during the round trip means another one."""
        try:
            while self._due:
                if len(self._due) < GATHER_MAX and not self._settling:
                    with contextlib.suppress(TimeoutError):  # gathering, unless hurried
                        async with asyncio.timeout(GATHER_S):
                            await self._now.wait()
                self._now.clear()
                batch = self._batch = self._due
                self._due = []
                try:
                    stale = [sub for sub, seen in batch if seen != self._reconnects()]
                    for _ in range(2):
                        for sub in stale:
                            await self._unsubscribe(sub)
                        since = self._reconnects()
                        if not await round_trip(self._nc, ROUND_TRIP_S):
                            raise NatsError("no answer from the server")
                        if self._reconnects() == since:
                            break
                        stale = [sub for sub, _ in batch]  # all replayed during the round trip
                    else:
                        raise NatsError("reconnected during each round trip")
                except NatsError as e:  # closed, or no answer in time
                    log.debug("retiring %d single-shot subscriptions: %s", len(batch), e)
                if not self._nc.is_closed:  # what came is handed to the callback (closed: no use)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(ROUND_TRIP_S):
                            for sub, _ in batch:
                                await sub._pending_queue.join()
                for sub, _ in batch:
                    await _forget(sub)
        finally:
            self._task, self._batch = None, []

    async def settled(self) -> None:
        """Retire what is due at once, and wait for it (on drain, before the connection closes)."""
        self._settling += 1
        try:
            while self._task is not None:
                self._now.set()
                await asyncio.shield(self._task)
        finally:
            self._settling -= 1

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
