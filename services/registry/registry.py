"""The registry: fleet membership, the model index, placement, pins and fleet-wide model pulls.

Membership. Agents write their own state to the ``{root}_agents`` KV bucket (on change and on a
heartbeat) and delete it when they stop cleanly. The registry watches that bucket and

- announces ``joined`` on ``{root}.events.agent`` when an agent appears (or restarts);
- announces ``left`` when an agent deleted its own key;
- declares an agent ``dead`` when its state is older than ``dead_after_s`` (default: three of the
  agent's own heartbeats), or sooner when NATS says nothing subscribes to its subjects any more
  (its process is gone; `corral.registry.liveness`): it deletes the key *at the revision it
  judged* (``last=revision``), so a state written meanwhile wins and the agent stays. The gateway
  stops routing to the agent as soon as its key is gone (and already stops after three missed
  heartbeats by itself).

Several registries may run at once without double-acting: every announcement is made by whoever
wins a KV compare-and-set on a ``member.{id}`` marker in the views bucket, and the death delete is
a compare-and-set too.

Model index. Every copy keeps the ``model.{token}`` keys of the ``{root}_models`` bucket (which
agents have each model on disk and loaded) up to date; see `corral.registry.index`.

Pulls. ``{root}.registry.pull``: one copy runs each pull on the agents it chooses and merges their
progress into one reply; see `corral.registry.pulls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import msgspec
import nats.errors
from corral.protocol.messages import AgentEvent, AgentState, agent_state_of
from corral.protocol.subjects import Subjects, registry_sender
from corral.registry.index import ModelIndexWriter
from corral.registry.liveness import Known as Heard
from corral.registry.liveness import Prober
from corral.registry.pins import PinKeeper
from corral.registry.placement import Placer, ReplicaSettings
from corral.registry.pulls import FleetPulls
from corral.registry.rebalance import Rebalancer
from corral.registry.settings import RegistrySettings
from corral.runtime.buckets import Buckets, Reopener, ensure_buckets_at_start, kv_create
from corral.runtime.fleet import SILENT_RESTART_S, STALE_HEARTBEATS, FleetView, received_at
from corral.runtime.kvwatch import watch_until, watching
from corral.runtime.nats import NatsAuth, connect, published
from corral.runtime.tasks import cancel_and_wait, supervise
from corral.transport import Transport
from nats.aio.client import Client as NATS
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

QUEUE_GROUP = "registry"
_enc = msgspec.json.Encoder()
_DEAD = b"dead"


class Registry:
    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.root)
        self.nc: NATS | None = None
        self._buckets: Buckets | None = None
        self._fleet: FleetView | None = None
        self._transport: Transport | None = None
        self._known: dict[str, _Known] = {}  # agent id → its last state, as heard
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = asyncio.Event()
        self._pulls: FleetPulls | None = None  # fleet-wide pulls under way
        self.placer: Placer | None = None
        self.pins: PinKeeper | None = None  # pinned models (18 attributes: each job's own state)
        self.rebalancer: Rebalancer | None = None  # switches cards to where a steady load waits
        self._index: ModelIndexWriter | None = None  # the model index in the models bucket
        self.lost = asyncio.Event()  # the NATS connection closed for good: the process must exit
        self._reopener: Reopener | None = None  # the buckets again after a NATS restart
        self._rewatch = asyncio.Event()  # the buckets were opened again: watch them anew
        self._prober: Prober | None = None  # finds agents whose connection is gone

    @property
    def fleet(self) -> FleetView:
        assert self._fleet is not None, "registry not started"
        return self._fleet

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.nc = await connect(
            self.settings.nats_url,
            name="corral-registry",
            auth=NatsAuth.of(self.settings),
            on_closed=self.lost.set,
            on_reconnected=self._reconnected,
            on_disconnected=self._disconnected,
        )
        self._buckets = await ensure_buckets_at_start(
            self.nc.jetstream(), self.subjects, replicas=self.settings.js_replicas
        )
        self._reopener = Reopener(self.nc, self.subjects, self._reopened, replicas=self.settings.js_replicas)
        self._reopener.start()
        self._fleet = FleetView(self._buckets.agents)
        await self._fleet.start()
        # its replies under the registry's token: what the registry identity may read (`registry_sender`)
        self._transport = Transport(self.nc, self.subjects, sender_id=registry_sender(secrets.token_hex(6)))
        await self._transport.start()
        self._spawn("registry watch", self._watch, "registry-watch", wake=self._rewatch)
        await asyncio.wait_for(self._synced.wait(), 10)
        self._index = ModelIndexWriter(self._buckets.agents, self._buckets.models)
        await self._index.start()
        self._spawn("registry reaper", self._reaper, "registry-reaper")
        if self.settings.probe_s > 0:
            self._prober = Prober(
                self.nc,
                self.subjects,
                self.settings.probe_s,
                self._heard,
                self._vanished,
                per_s=self.settings.probes_per_s,
            )
            self._spawn("agent probes", self._prober.run, "registry-probes")
        self._pulls = FleetPulls(
            self.nc,
            self.subjects,
            self._fleet,
            self._transport,
            pull_timeout_s=self.settings.pull_timeout_s,
            ping_interval_s=self.settings.ping_interval_s,
        )
        await self._pulls.listen(QUEUE_GROUP)
        # every copy hears a pull's cancel: the one running it stops it
        await self.nc.subscribe(self.subjects.registry_ctl, cb=published(self._pulls.on_cancel))
        self.rebalancer = Rebalancer(
            self.nc,
            self.subjects,
            self._fleet,
            self._transport,
            self._buckets.views,
            self.settings.rebalance_s,
            pinned=lambda: self.placer.pinned if self.placer is not None else frozenset(),
            preload_timeout_s=self.settings.pull_timeout_s,
        )
        self.placer = Placer(
            self.nc,
            self.subjects,
            self._fleet,
            self._buckets.models,
            self._transport,
            ReplicaSettings(self.settings.replica_check_s),
            load_grace_s=self.settings.load_grace_s,
            preload_timeout_s=self.settings.pull_timeout_s,
            marker_ttl_s=self.settings.load_marker_ttl_s,
            demand=self.rebalancer.demand,  # replicas spare the slots a model's demand needs
        )
        await self.nc.subscribe(
            self.subjects.registry("place"), queue=QUEUE_GROUP, cb=published(self.placer.on_place)
        )
        await self.nc.subscribe(
            self.subjects.registry("unplace"), queue=QUEUE_GROUP, cb=published(self.placer.on_unplace)
        )
        self._spawn("replica loop", self.placer.replica_loop, "registry-replicas")
        self._spawn("load markers", self.placer.marker_loop, "registry-markers")
        self.pins = PinKeeper(self.placer, self._buckets)
        self._spawn("pin keeper", self.pins.run, "registry-pins")
        self._spawn("rebalancer", self.rebalancer.run, "registry-rebalance")
        log.info("registry ready: %d agents", len(self._known))

    def _spawn(
        self, what: str, run: Callable[[], Awaitable[None]], name: str, wake: asyncio.Event | None = None
    ) -> None:
        self._tasks.append(asyncio.create_task(supervise(what, run, wake=wake), name=name))

    async def stop(self) -> None:
        if self._pulls is not None:  # first: a pull it ends is sent again, to a copy that stays
            await self._pulls.stop()
        if self._reopener is not None:
            await self._reopener.stop()
        if self.placer is not None:
            await self.placer.stop()
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self._index is not None:
            await self._index.stop()
        if self._transport is not None:
            await self._transport.stop()
        if self._fleet is not None:
            await self._fleet.stop()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error):  # closed meanwhile: nothing left to drain
                await self.nc.drain()

    def _disconnected(self) -> None:
        if self._fleet is not None:  # agents' silence while NATS is away is not theirs
            self._fleet.connection_lost()

    def _reconnected(self) -> None:
        """Back on NATS, maybe a restarted one that lost its memory buckets: open them again."""
        if self._reopener is not None:
            self._reopener.request()

    def _reopened(self) -> None:
        """The buckets are open again: every watch starts anew from the bucket's snapshot."""
        self.fleet.restart()
        self._rewatch.set()
        if self.pins is not None:
            self.pins.restart()
        if self._index is not None:
            self._index.restart()

    # -- membership ----------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Watch the agents bucket for ever (its supervisor reopens it; a missing bucket is made)."""
        while True:
            try:
                await watch_until(self._watch_once, self._rewatch)
            except (nats.errors.Error, TimeoutError) as e:
                if self._reopener is not None:
                    self._reopener.missing(e)
                raise

    async def _watch_once(self) -> None:
        """One watch: its snapshot (agents known but missing from it are gone), then every change
        until it is silent for `SILENT_RESTART_S` (a NATS restart replaced the bucket under it)."""
        assert self._buckets is not None
        seen: set[str] | None = set()  # the snapshot's agents, until it ends
        async with watching(self._buckets.agents) as watcher:
            while True:
                try:
                    entry = await watcher.updates(timeout=SILENT_RESTART_S)
                except nats.errors.TimeoutError:  # agents heartbeat: a NATS restart replaced the bucket
                    return
                if entry is None:
                    await self._forget_missing(seen or set())
                    seen = None
                    self._synced.set()
                    continue
                await self._seen(entry, snapshot=seen is not None)
                if seen is not None:
                    seen.add(entry.key)

    async def _forget_missing(self, seen: set[str]) -> None:
        """After a snapshot: agents it lacks are gone — unless heard within their liveness window.
        A watch opened again while a NATS cluster elects a leader (or on a bucket a restarted server
        is refilling) can see an empty or partial snapshot; announcing those agents `left` would be
        false, and they would be `joined` again at their next heartbeat. Those kept are declared
        dead by the reaper if they stay silent (`corral.runtime.fleet.FleetView`'s rule too)."""
        now = time.monotonic()
        for agent_id in set(self._known) - seen:
            known = self._known[agent_id]
            if now - known.heard > self._dead_after(known.state):
                self._known.pop(agent_id, None)
                await self._gone(agent_id)

    async def _seen(self, entry: KeyValue.Entry, *, snapshot: bool) -> None:
        agent_id, revision = entry.key, entry.revision or 0
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._known.pop(agent_id, None)
            await self._gone(agent_id)
            return
        try:
            state = agent_state_of(agent_id, entry.value)
        except msgspec.DecodeError as e:
            log.warning("ignoring agent state for %s: %s", agent_id, e)
            return
        previous = self._known.get(agent_id)
        if previous is None or previous.state.started_at != state.started_at:
            await self._joined(state)  # raises (a KV call failed): known only once announced
        self._known[agent_id] = _Known(revision, state, received_at(entry, snapshot=snapshot))

    def _heard(self) -> dict[str, Heard]:
        return {agent_id: Heard(known.heard, known.revision) for agent_id, known in self._known.items()}

    async def _vanished(self, agent_id: str, revision: int) -> None:
        """Nothing subscribes to the agent's subjects any more: its process is gone. ``revision``:
        the state judged, as heard before the probes went out (one written since wins)."""
        if agent_id in self._known:
            await self._declare_dead(agent_id, revision, "its NATS connection is gone")

    def _dead_after(self, state: AgentState) -> float:
        return self.settings.dead_after_s or STALE_HEARTBEATS * state.heartbeat_s

    async def _reaper(self) -> None:
        """Judge silent agents by when their state arrived here (monotonic), never by their own
        clocks. Wakes at the earliest moment one could be late; no NATS polling."""
        while True:
            now = time.monotonic()
            wake = 1.0
            for agent_id, known in list(self._known.items()):
                late = known.heard + self._dead_after(known.state) - now
                if late <= 0:
                    await self._declare_dead(agent_id, known.revision, "it missed its heartbeats")
                else:
                    wake = min(wake, late)
            await asyncio.sleep(max(wake, 0.05))  # the next deadline, not a poll

    async def _declare_dead(self, agent_id: str, revision: int, why: str) -> None:
        """Remove an agent that missed its heartbeats (or whose connection is gone: ``why``), and
        announce it. The ``dead`` marker goes
        first, so that a registry seeing the delete does not announce a clean ``left``; when the
        compare-and-set delete then fails (the agent spoke again, or another registry removed it),
        the marker is put back as it was, so the agent's next clean stop is still announced."""
        assert self._buckets is not None
        marker = _member_key(agent_id)
        before = None
        try:
            before = await self._buckets.views.get(marker)
            mine = await self._buckets.views.update(marker, _DEAD, last=before.revision)
        except (KeyNotFoundError, KeyWrongLastSequenceError):
            mine = None  # another registry is on it, or it never joined
        try:
            await self._buckets.agents.delete(agent_id, last=revision)
        except APIError:  # wrong last sequence: it spoke again, or another registry removed it
            if mine is not None and before is not None and before.value is not None:
                with contextlib.suppress(KeyWrongLastSequenceError):
                    await self._buckets.views.update(marker, before.value, last=mine)
            return
        self._known.pop(agent_id, None)
        log.warning("agent %s removed from the fleet: %s", agent_id, why)
        await self._announce("dead", agent_id)
        try:
            await self._buckets.views.delete(marker)
        except nats.errors.Error as e:  # left behind: the agent's next join rewrites it
            log.warning("cannot drop the membership marker of %s: %s", agent_id, e)

    async def _joined(self, state: AgentState) -> None:
        assert self._buckets is not None
        marker, value = _member_key(state.id), str(state.started_at).encode()
        try:
            await kv_create(self._buckets.views, marker, value)
        except KeyWrongLastSequenceError:  # known: announce only if it restarted, and only once
            try:
                entry = await self._buckets.views.get(marker)
            except KeyNotFoundError:
                return
            if entry.value == value:
                return
            try:
                await self._buckets.views.update(marker, value, last=entry.revision)
            except KeyWrongLastSequenceError:
                return
        log.info("agent %s joined (%s on %s)", state.id, state.vendor, state.host)
        await self._announce("joined", state.id)

    async def _gone(self, agent_id: str) -> None:
        assert self._buckets is not None
        marker = _member_key(agent_id)
        try:
            entry = await self._buckets.views.get(marker)
        except KeyNotFoundError:
            return
        if entry.value == _DEAD:
            return  # the registry that judged it announces the death
        try:
            await self._buckets.views.delete(marker, last=entry.revision)
        except APIError:
            return
        log.info("agent %s left", agent_id)
        await self._announce("left", agent_id)

    async def _announce(self, kind: str, agent_id: str) -> None:
        assert self.nc is not None
        event = AgentEvent(kind=kind, agent=agent_id, at=time.time())  # type: ignore[arg-type]
        await self.nc.publish(self.subjects.event("agent"), _enc.encode(event))


class _Known(NamedTuple):
    revision: int  # the KV revision of ``state``: the death delete is conditional on it
    state: AgentState
    heard: float  # when it arrived (monotonic; see `received_at`)


_member_key = "member.{}".format  # an agent's membership marker in the views bucket
