"""Demand-driven replicas, decided on queue events: the registry's side of `corral.routing.replicas`.

Every enqueue publishes an empty nudge on ``{root}.queued.{vendor}.{token}``. The registry listens
to all of them and checks that model's backlog at once: one check in flight per model, and the
nudges that arrive meanwhile make it check once more when it is done, not once each (and one model
is checked at most every `RECHECK_MIN_S`, so a flood of nudges is not a flood of reads). While the
backlog persists it checks again after `RECHECK_SHARE` of the model's load time (as observed,
`corral.routing.load_time`; at least `RECHECK_MIN_S`, at most ``check_s``): a model whose loads take
a second is looked at every quarter second, one whose loads take a minute every ``check_s``. Every
``check_s`` the registry also reads every model's queue depth (the fallback for missed nudges).

A check reads the model's queue depth and lets `corral.routing.plan_replicas` decide how many more
loads it needs, and where. How long one request holds a slot (what the backlog's drain time is made
of) is what the model's holders observed (`corral.routing.request_time`: the median over the agents
that published one, `TYPICAL_REQUEST_S` before any), or longer when the backlog drains slower than
the warm slots would at that pace (requests longer than those seen finishing hold them: a backlog
that has not moved at all in that time counts as one they may never drain). Loads this registry
placed (its load markers) or sent (its preloads, until the agent shows the model warm) count as
loads under way. Each replica is a preload (Ollama's empty generate) sent straight to its agent
(`corral.registry.preload`); an agent where one failed gets no other for `RETRY_S`. A replica
evicts no model whose demand, as the registry's rebalancing measures it, needs the slots it would
lose there (a steady load on it would make the next backlog load it back). Replicas that
then sit idle are let go by Ollama's own ``keep_alive``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field

import nats.errors
from corral.protocol.errors import CorralError
from corral.protocol.messages import AgentState
from corral.protocol.names import decode_token
from corral.protocol.subjects import Subjects
from corral.registry.preload import preload, serves
from corral.routing import TYPICAL_REQUEST_S, Demand, ReplicaPlan, Route, Router, plan_replicas, warm
from corral.runtime.fleet import FleetView
from corral.runtime.nats import published
from corral.runtime.tasks import cancel_and_wait
from corral.runtime.workqueue import depths
from corral.transport import Transport
from corral.views.status import queue_by_token
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

log = logging.getLogger(__name__)

RECHECK_SHARE = 0.25  # a persisting backlog is checked again after this share of a load
RECHECK_MIN_S = 0.05  # ... but not more often than this
REPLICA_SETTLE_S = 10.0  # at most this long from a replica's load to its agent showing it warm
RETRY_S = 10.0  # an agent where a replica's load failed gets no other for this long


@dataclass(frozen=True)
class ReplicaSettings:
    check_s: float = 1.0  # the fallback resync: every model's queue depth is read this often; 0 = off


@dataclass(eq=False)
class _Backlog:
    """One model's backlog while it lasts: its check task, and how it has drained so far."""

    nudged: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    since: float | None = None  # when this window of the backlog began (monotonic)
    depth: int = 0  # its depth then
    enqueued: int = 0  # requests nudged in since
    warm_slots: int = 0  # slots serving the model then (the window restarts when they change)
    starting: set[str] = field(default_factory=set)  # agents this registry is loading it on


class Replicator:
    """Listens to the queue's nudges, checks backlogs, starts the replica loads they need."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        fleet: FleetView,
        transport: Transport,
        settings: ReplicaSettings,
        *,
        pinned: Callable[[], frozenset[str]] = frozenset,
        placing: Callable[[str], frozenset[str]] = lambda _token: frozenset(),
        demand: Callable[[], Mapping[str, Demand]] = dict,
        preload_timeout_s: float = 3600.0,
    ) -> None:
        """``pinned``: the models kept warm now; ``placing``: agents a load of a model token was
        placed on and is still marked (`corral.registry.placement.Placer`); ``demand``: each
        model's measured demand (`corral.registry.rebalance.Rebalancer.demand`): a replica does not
        evict a model from slots its demand needs."""
        self.nc = nc
        self.subjects = subjects
        self.fleet = fleet
        self.transport = transport
        self.settings = settings
        self._pinned = pinned
        self._placing = placing
        self._demand = demand
        self.preload_timeout_s = preload_timeout_s  # a replica's load may take this long
        self.backlogs: dict[str, _Backlog] = {}  # model token → its backlog, while it lasts
        self._tasks: set[asyncio.Task[None]] = set()  # checks and preloads under way
        self.loads_started = 0  # replica loads this copy started (for tests and logs)
        self.plans: dict[str, ReplicaPlan] = {}  # model token → the last decision on its backlog
        self._router = Router()  # ranks replica candidates; keeps the holders' observations
        self._failed: dict[str, float] = {}  # agent id → when a replica's load there failed (monotonic)

    # -- events --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Listen to nudges; resync every ``check_s``. Returns at once when demand-driven replicas
        are off (``check_s`` 0)."""
        if self.settings.check_s <= 0:
            return
        sub = await self.nc.subscribe(self.subjects.queued_all, cb=published(self._on_nudge))
        try:
            while True:
                try:
                    await self.resync()
                except nats.errors.Error as e:  # NATS away for a moment: the next resync reads again
                    log.warning("replica resync failed: %s", e)
                await asyncio.sleep(self.settings.check_s)  # the fallback period, not a wait for an event
        finally:
            with contextlib.suppress(nats.errors.Error):  # the connection is gone already
                await sub.unsubscribe()

    async def _on_nudge(self, msg: Msg) -> None:
        self.nudge(msg.subject.rsplit(".", 1)[-1], enqueued=1)

    def nudge(self, token: str, *, enqueued: int = 0) -> None:
        """Check ``token``'s backlog now, or once more after the check in flight."""
        backlog = self.backlogs.setdefault(token, _Backlog())
        backlog.enqueued += enqueued
        backlog.nudged.set()
        if backlog.task is None or backlog.task.done():
            backlog.task = self._spawn(self._watch(token, backlog), f"replicas-{token}")

    async def resync(self) -> None:
        """Every model with requests waiting gets a check (nudges may have been missed)."""
        for token, depth in (await self._depths()).items():
            if depth > 0:
                self.nudge(token)

    async def _watch(self, token: str, backlog: _Backlog) -> None:
        """Check ``token``'s backlog until it is gone: on a nudge (at most every `RECHECK_MIN_S`),
        else every `RECHECK_SHARE` of the model's load time."""
        while True:
            backlog.nudged.clear()
            started = time.monotonic()
            try:
                plan = await self.check(token, backlog)
            except nats.errors.Error as e:  # NATS away for a moment: the resync looks again
                log.warning("replica check of %s failed: %s", decode_token(token), e)
                plan = None
            if plan is None and not backlog.nudged.is_set():
                if self.backlogs.get(token) is backlog and not backlog.starting:
                    del self.backlogs[token]
                return
            wait = self.settings.check_s if plan is None else self._recheck_s(plan)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await backlog.nudged.wait()
            # however fast the nudges come, one model's queue is read at most every RECHECK_MIN_S
            spacing = started + RECHECK_MIN_S - time.monotonic()
            if spacing > 0:
                await asyncio.sleep(spacing)  # a rate bound, not a wait for an event

    def _recheck_s(self, plan: ReplicaPlan) -> float:
        return min(max(RECHECK_SHARE * plan.load_s, RECHECK_MIN_S), self.settings.check_s)

    # -- decisions -----------------------------------------------------------------------------
    async def check(self, token: str, backlog: _Backlog) -> ReplicaPlan | None:
        """Read ``token``'s backlog and start the loads it needs; None when nothing waits."""
        depth = (await self._depths()).get(token, 0)
        if depth <= 0:
            backlog.since = None
            return None
        key = decode_token(token)
        route = Route(key=key)
        now = time.monotonic()
        self._failed = {a: t for a, t in self._failed.items() if now - t < RETRY_S}
        # an agent whose last replica load failed (gone, say, before the registry heard of it) is
        # no candidate for a while, lest every check send it another; the model it serves counts
        holders = [a for a in self._holders(route) if a.id not in self._failed or warm(route, a)]
        warm_slots = sum(max(a.parallel, 1) for a in holders if warm(route, a))
        if backlog.since is None or warm_slots != backlog.warm_slots:
            backlog.since, backlog.depth, backlog.enqueued, backlog.warm_slots = now, depth, 0, warm_slots
        plan = plan_replicas(
            route,
            holders,
            depth,
            self._request_s(key, holders, backlog, depth, now),
            starting=frozenset(backlog.starting) | self._placing(token),
            pinned=self._pinned(),
            router=self._router,
            fleet=[a for a in self.fleet.agents() if a.status == "active"],
            demand=self._demand(),
        )
        self.plans[token] = plan
        for agent_id in plan.load:
            self.loads_started += 1
            backlog.starting.add(agent_id)
            drained = (
                f"drained in {plan.drain_s:.1f}s" if math.isfinite(plan.drain_s) else "no slot serves them"
            )
            log.info(
                "%d requests wait for %s (%s, a load takes %.1fs): loading a replica on %s",
                depth,
                key,
                drained,
                plan.load_s,
                agent_id,
            )
            self._spawn(self._preload(agent_id, key, backlog), f"replica-{agent_id}")
        return plan

    def _request_s(
        self, key: str, holders: list[AgentState], backlog: _Backlog, depth: int, now: float
    ) -> float:
        """Seconds one of ``key``'s requests holds a slot: as its holders observed, or longer when
        the backlog has drained slower than its warm slots would at that pace."""
        seen = self._router.observations(holders)[1].requests.get(key, TYPICAL_REQUEST_S)
        elapsed = now - (backlog.since or now)
        if not backlog.warm_slots or elapsed < seen:
            return seen  # too soon to tell how fast it drains
        drained = backlog.depth + backlog.enqueued - depth
        if drained <= 0:
            return math.inf  # not one started in a request's time: the slots may never free
        return max(seen, backlog.warm_slots * elapsed / drained)

    def _holders(self, route: Route) -> list[AgentState]:
        return [a for a in self.fleet.with_model(route.key) if a.status == "active"]

    async def _depths(self) -> dict[str, int]:
        """Requests waiting per model token (its vendor and batch lanes together)."""
        return queue_by_token(await depths(self.nc, self.subjects))

    # -- loads ---------------------------------------------------------------------------------
    async def _preload(self, agent_id: str, key: str, backlog: _Backlog) -> None:
        # it counts as loading here until the fleet shows it serving, lest the next check load it there again
        try:
            await preload(
                self.transport,
                self.fleet,
                agent_id,
                key,
                timeout=self.preload_timeout_s,
                shown=lambda: serves(self.fleet, agent_id, key),
                settle_s=REPLICA_SETTLE_S,
            )
        except (CorralError, nats.errors.Error) as e:
            log.warning("replica of %s on %s did not load: %s", key, agent_id, e)
            self._failed[agent_id] = time.monotonic()
        finally:
            backlog.starting.discard(agent_id)

    def _spawn(self, work: Coroutine[object, object, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("replica work %s failed", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """End the checks and preloads under way (the listening ends with `run`'s task)."""
        await cancel_and_wait(set(self._tasks))
