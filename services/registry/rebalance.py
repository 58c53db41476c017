"""Rebalancing, on the agents' slot time and queue depths: the registry's side of
`corral.routing.rebalance`.

Every registry copy measures each model's demand (`corral.routing.DemandMeter`, time constant
``rebalance_s``): the slot-seconds its requests held, from the agents' running totals in their
states (`corral.routing.SlotTimeReadings`: a stream running for minutes counts while it runs), and
the fleet queue's depth, both read every `sample_s` of that. The one copy holding the
``rebalance.keeper`` lease (`corral.registry.lease`) acts: once demand has been measured for
``rebalance_s``, it lets `corral.routing.plan_move` pick a card to switch, and sends that agent a
preload of the waiting model (`corral.registry.preload`); Ollama lets the other model's requests
there finish and unloads it (the agent sends it no more meanwhile). One switch at a time; the next
is weighed only ``rebalance_s`` after this one ended (demand moves once the load does), and no
sooner than `LOADS_BETWEEN` times as long as it took. A card where a switch failed is left alone
for ``rebalance_s``; while no agent has reported slot time (no request ran yet, or every agent is
of a version that does not report it) nothing is switched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import nats.errors
from corral.protocol.errors import CorralError
from corral.protocol.subjects import Subjects
from corral.registry.lease import Lease
from corral.registry.preload import preload, serves
from corral.routing import Demand, DemandMeter, Move, Router, SlotTimeReadings, plan_move
from corral.runtime.fleet import FleetView
from corral.runtime.tasks import cancel_and_wait
from corral.runtime.workqueue import depths
from corral.transport import Transport
from corral.views.status import queue_by_model
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

LEASE_KEY = "rebalance.keeper"  # in the views bucket: which registry copy switches cards
LEASE_S = 10.0  # a lease not renewed for this long is taken over
SAMPLE_SHARE = 0.05  # the queue's depth is read every this share of ``rebalance_s`` ...
SAMPLE_MAX_S = 1.0  # ... and at least this often
LOADS_BETWEEN = 4.0  # switches are at least this many of the last one's load times apart
SETTLE_S = 10.0  # at most this long from a switch's load to its agent showing the model warm


class Rebalancer:
    """Measures demand, and (holding the lease) switches one card at a time to where it waits."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        fleet: FleetView,
        transport: Transport,
        views: KeyValue,
        rebalance_s: float,
        *,
        pinned: Callable[[], frozenset[str]] = frozenset,
        preload_timeout_s: float = 3600.0,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.fleet = fleet
        self.transport = transport
        self.rebalance_s = rebalance_s
        self.preload_timeout_s = preload_timeout_s
        self._pinned = pinned
        self.lease = Lease(views, LEASE_KEY, LEASE_S)
        self.meter = DemandMeter(rebalance_s, time.monotonic()) if rebalance_s > 0 else None
        self._slot_time = SlotTimeReadings()
        self._router = Router()
        self._switch: asyncio.Task[None] | None = None
        self._next_at = 0.0  # monotonic: no switch is weighed before this
        self._failed: dict[str, float] = {}  # agent id → when a switch there failed (monotonic)
        self.moves: list[Move] = []  # the switches this copy started (for tests and logs)

    def demand(self) -> dict[str, Demand]:
        """Each model's demand as measured so far (empty when rebalancing is off)."""
        return self.meter.demand() if self.meter is not None else {}

    @property
    def sample_s(self) -> float:
        return min(SAMPLE_SHARE * self.rebalance_s, SAMPLE_MAX_S)

    async def run(self) -> None:
        """Measure and act until cancelled; returns at once when rebalancing is off."""
        if self.meter is None:
            return
        self._next_at = self.meter.since + self.rebalance_s
        try:
            while True:
                try:
                    await self.step()
                except nats.errors.Error as e:  # NATS away for a moment: the next step reads again
                    log.warning("rebalance step failed: %s", e)
                await asyncio.sleep(self.sample_s)  # the sampling period, not a wait for an event
        finally:
            await self.stop()

    async def step(self) -> Move | None:
        """Sample the slot time and the queue; while holding the lease and free to, start the
        switch the demand asks."""
        assert self.meter is not None, "rebalancing is off"
        for key, seconds in self._slot_time.read(self.fleet.agents()).items():
            self.meter.ran(key, seconds)
        waiting = queue_by_model(await depths(self.nc, self.subjects))
        now = time.monotonic()
        self.meter.sample(now, waiting)
        if now < self._next_at or (self._switch is not None and not self._switch.done()):
            return None
        if not await self.lease.held():
            return None
        demand = self.meter.demand()
        if not any(d.running > 0 for d in demand.values()):
            return None  # no slot time reported (nothing ran yet, or agents that do not report it): blind
        self._failed = {a: t for a, t in self._failed.items() if now - t < self.rebalance_s}
        move = plan_move(
            self.fleet.agents(),  # those heard lately
            demand,
            pinned=self._pinned(),
            avoid=frozenset(self._failed),
            router=self._router,
            waiting_now=waiting,
        )
        if move is None:
            return None
        wanted = demand[move.key]
        log.info(
            "%s: %.1f requests in the fleet on average (%.1f waiting); switching %s to it%s (a load of %.1fs)",
            move.key,
            wanted.total,
            wanted.waiting,
            move.agent,
            f" from {', '.join(move.evicts)}" if move.evicts else "",
            move.load_s,
        )
        self.moves.append(move)
        self._switch = asyncio.create_task(self._load(move), name=f"rebalance-{move.agent}")
        return move

    async def _load(self, move: Move) -> None:
        began = time.monotonic()
        try:
            await preload(
                self.transport,
                self.fleet,
                move.agent,
                move.key,
                timeout=self.preload_timeout_s,
                shown=lambda: serves(self.fleet, move.agent, move.key),
                settle_s=SETTLE_S,
            )
        except (CorralError, nats.errors.Error) as e:
            log.warning("switching %s to %s failed: %s", move.agent, move.key, e)
            self._failed[move.agent] = time.monotonic()
        ended = time.monotonic()
        self._next_at = ended + max(self.rebalance_s, LOADS_BETWEEN * (ended - began))

    async def stop(self) -> None:
        """End a switch under way (its load goes on in Ollama; the agent shows where it ends)."""
        if self._switch is not None:
            await cancel_and_wait({self._switch})
