"""Models kept warm: the registry keeps every pinned model loaded on as many live agents as its pin
asks for.

A pin (``corral pin MODEL --replicas N [--vendor V]``) is part of the policy record in the
``{root}_policy`` bucket (its ``pins`` field; `corral.views.status.Pin`), which every registry
copy watches (`corral.runtime.policy.PolicyStore`). One copy acts on the pins: the one holding the
``pins.keeper`` lease in the views bucket, taken and renewed by compare-and-set
(`corral.registry.lease`; a copy that stops renewing it for `LEASE_S` is replaced). On every change
of the fleet, and at least every `CHECK_S`, that copy works out what each pin lacks (`plan`):

- an active agent (of the pin's vendor) with a runner of the model counts as a replica; a
  draining or cordoned agent, or one that died, no longer does, so its replica is placed again;
- a replica whose runner would expire is loaded again with ``keep_alive: -1``, which Ollama keeps
  loaded until it is told otherwise (https://github.com/ollama/ollama/blob/main/docs/faq.md);
- missing replicas are loaded (a preload with ``keep_alive: -1``, `corral.registry.preload`) on
  the agents that have the model on disk, cheapest first by the routing cost model, as cold loads
  are placed, sparing agents where the load would evict another pinned model.

Pinned models also count as busy for the placement of ordinary cold loads: the placer passes the
pinned set to `corral.routing.Router.rank`, which ranks agents where a load would evict one last.

On unpin the keeper sends each agent still holding the model an empty generate with Ollama's
default ``keep_alive`` (`RELEASE_KEEP_ALIVE`; a request without one would leave the runner's
``-1`` in place): it is let go once idle that long, as any other model.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from dataclasses import dataclass

import nats.errors
from corral.protocol.errors import CorralError
from corral.protocol.messages import AgentState
from corral.protocol.names import key_of
from corral.registry.lease import Lease
from corral.registry.placement import Placer
from corral.registry.preload import preload
from corral.routing import Route, Router
from corral.runtime.buckets import Buckets
from corral.runtime.policy import Policy, PolicyStore
from corral.runtime.tasks import cancel_and_wait
from corral.views.status import Pin, pinned_on

log = logging.getLogger(__name__)

LEASE_KEY = "pins.keeper"  # in the views bucket: which registry copy acts on the pins
LEASE_S = 10.0  # a lease not renewed for this long is taken over
CHECK_S = 1.0  # the pins are checked at least this often (and on every fleet change) ...
CHECK_MIN_S = 0.25  # ... but on fleet changes not more often than this: a large fleet changes
# hundreds of times a second (heartbeats alone); a change of the pins is acted on at once
SETTLE_S = 10.0  # at most this long from a load's answer to its agent showing the runner
RETRY_S = 10.0  # a load that failed on an agent is not tried there again for this long
RELEASE_KEEP_ALIVE = "5m"  # what an unpinned model gets back: Ollama's default keep_alive
FOREVER_YEARS = 100  # a runner expiring this many years ahead was loaded with keep_alive -1


# -- what each pin lacks (pure) ---------------------------------------------------------------------
@dataclass(frozen=True)
class PinPlan:
    load: tuple[str, ...] = ()  # agents to load the model on (missing replicas)
    refresh: tuple[str, ...] = ()  # agents holding it with a runner that would expire


def forever(expires_at: str, now: datetime.datetime) -> bool:
    """Whether a runner expiring at ``expires_at`` (Ollama's RFC 3339 time) was loaded to stay."""
    try:
        return int(expires_at[:4]) >= now.year + FOREVER_YEARS
    except ValueError:
        return False


def plan(
    key: str,
    pin: Pin,
    agents: list[AgentState],
    *,
    starting: frozenset[str] = frozenset(),
    avoid: frozenset[str] = frozenset(),
    pinned: frozenset[str] = frozenset(),
    now: datetime.datetime | None = None,
    router: Router | None = None,
) -> PinPlan:
    """The loads pin ``key`` needs in the fleet ``agents``: ``starting`` are agents a load of it is
    under way on (they count as replicas), ``avoid`` agents not to try now (a load failed there),
    ``pinned`` every pinned model (loads that would evict another one are ranked last)."""
    now = now or datetime.datetime.now(datetime.UTC)
    have = set(pinned_on(key, pin, agents))
    by_id = {a.id: a for a in agents}
    refresh = tuple(  # an agent whose load failed lately is not asked again, for a refresh either
        a
        for a in sorted(have - starting - avoid)
        if not all(forever(m.expires_at, now) for m in by_id[a].loaded if key_of(m.name) == key)
    )
    missing = pin.replicas - len(have | (starting & by_id.keys()))
    if missing <= 0:
        return PinPlan(refresh=refresh)
    spare = [
        a
        for a in agents
        if a.status == "active"
        and a.id not in have | starting | avoid
        and (pin.vendor is None or a.vendor == pin.vendor)
        and any(key_of(m.name) == key for m in a.models)
    ]
    route = Route(key=key, vendor=pin.vendor, strict=pin.vendor is not None)
    ranked = (router or Router()).rank("auto", route, spare, {}, pinned - {key})
    return PinPlan(load=tuple(a.id for a in ranked[:missing]), refresh=refresh)


# -- the keeper -------------------------------------------------------------------------------------
class PinKeeper:
    """Watches the pins and, while it holds the lease, loads what they lack. ``run`` is the one
    long-lived task (under `corral.runtime.tasks.supervise`); `stop` cancels loads under way."""

    def __init__(self, placer: Placer, buckets: Buckets) -> None:
        self.placer = placer  # its fleet view and transport; told the pinned models (loads spare them)
        self.fleet = placer.fleet
        self.policy = PolicyStore(buckets.policy, on_change=self._on_policy)  # the pins, as they are now
        self.kept: dict[str, Pin] = {}  # the pins this copy acted on (to let go of on unpin)
        self.changed = asyncio.Event()  # the pins changed, or the keeper checked them
        self.lease = Lease(buckets.views, LEASE_KEY, LEASE_S)  # held by the one copy that acts
        self._router = Router()
        self._starting: dict[str, set[str]] = {}  # model key → agents a load is under way on
        self._failed: dict[tuple[str, str], float] = {}  # (key, agent) → monotonic time of failure
        self._loads: set[asyncio.Task[None]] = set()
        self.loads_started = 0  # for tests and logs
        self.rounds = 0  # checks the keeper's loop made (for tests)

    @property
    def pins(self) -> dict[str, Pin]:
        """The pins as the policy record says now."""
        return self.policy.policy.pins

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self.pins)

    def restart(self) -> None:
        """Watch the pins anew (the buckets were opened again)."""
        self.policy.restart()

    async def run(self) -> None:
        """Watch the pins and keep them; the loads under way end with it."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.policy.watch())
                tg.create_task(self._keep())
        finally:
            await cancel_and_wait(self._loads)

    def _on_policy(self, policy: Policy) -> None:
        self.placer.pinned = frozenset(policy.pins)
        self.changed.set()

    async def _keep(self) -> None:
        while True:
            self.changed.clear()
            began = time.monotonic()
            self.rounds += 1
            try:
                await self.check()
            except nats.errors.Error as e:  # NATS away for a moment: the next check reads again
                log.warning("pin check failed: %s", e)
            waits = [
                asyncio.ensure_future(self.fleet.wait_changed(CHECK_S)),
                asyncio.ensure_future(self.changed.wait()),
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait(waits)
            if not self.changed.is_set():  # the fleet's changes gather until `CHECK_MIN_S` is out
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), began + CHECK_MIN_S - time.monotonic())

    async def check(self) -> None:
        """Act once on the pins as they are now, if this copy holds the lease."""
        pins = dict(self.pins)
        if not pins and not self.kept:
            return
        if not await self.lease.held():
            self.kept = pins  # another copy acts (and lets go of what is unpinned)
            return
        agents = [a for a in self.fleet.agents() if self.fleet.alive(a)]
        for key in set(self.kept) - set(pins):
            await self._let_go(key, self.kept[key], agents)
        self.kept = pins
        now = time.monotonic()
        self._failed = {k: t for k, t in self._failed.items() if now - t < RETRY_S}
        for key, pin in pins.items():
            starting = self._starting.setdefault(key, set())
            avoid = frozenset(a for k, a in self._failed if k == key)
            todo = plan(
                key,
                pin,
                agents,
                starting=frozenset(starting),
                avoid=avoid,
                pinned=self.pinned,
                router=self._router,
            )
            for agent_id in todo.load + todo.refresh:
                if agent_id in todo.load:
                    log.info("%s is pinned to %d replicas: loading it on %s", key, pin.replicas, agent_id)
                self._start(key, agent_id, keep_alive=-1)

    def _start(self, key: str, agent_id: str, keep_alive: int | str) -> None:
        self.loads_started += 1
        self._starting.setdefault(key, set()).add(agent_id)
        task = asyncio.create_task(self._load(key, agent_id, keep_alive))
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def _load(self, key: str, agent_id: str, keep_alive: int | str) -> None:
        try:  # it counts as starting until the fleet shows the runner
            await preload(
                self.placer.transport,
                self.fleet,
                agent_id,
                key,
                timeout=self.placer.preload_timeout_s,
                shown=lambda: self._shows(agent_id, key, keep_alive),
                settle_s=SETTLE_S,
                keep_alive=keep_alive,
            )
        except (CorralError, nats.errors.Error) as e:
            log.warning("pinned %s did not load on %s: %s", key, agent_id, e)
            self._failed[(key, agent_id)] = time.monotonic()
        finally:
            self._starting.get(key, set()).discard(agent_id)
            self.changed.set()

    def _shows(self, agent_id: str, key: str, keep_alive: int | str) -> bool:
        agent = self.fleet.get(agent_id)
        if agent is None:
            return True  # gone: nothing to wait for
        now = datetime.datetime.now(datetime.UTC)
        runners = [m for m in agent.loaded if key_of(m.name) == key]
        kept = [forever(m.expires_at, now) for m in runners]
        return bool(runners) and all(kept) == (keep_alive == -1)

    async def _let_go(self, key: str, pin: Pin, agents: list[AgentState]) -> None:
        """Unpinned: each agent still holding it gets Ollama's default keep-alive back."""
        for agent_id in pinned_on(key, Pin(replicas=pin.replicas), agents):
            log.info(
                "%s is no longer pinned: %s keeps it for %s once idle", key, agent_id, RELEASE_KEEP_ALIVE
            )
            self._start(key, agent_id, keep_alive=RELEASE_KEEP_ALIVE)
