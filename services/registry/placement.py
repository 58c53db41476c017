"""Cold-load placement and demand-driven replicas: where a model loads, and one load at a time.

``{root}.registry.place`` (queue group ``registry``): a gateway that finds no agent with a runner
for a request — and no load under way — asks where the model should load. The answer is

- the gateway's proposed agent, if that one already has a matching runner (the gateway's view was
  behind; ``mine=False``: the request waits in the queue for it);
- the agent a live load marker names (``mine=False``: someone else's request is loading it);
- otherwise the cheapest agent that needs a load, by the `auto` cost model — model on disk, fits in
  free VRAM, else the cheapest eviction — and ``mine=True``: the asking request is the one that
  loads it (a gateway asks only when it judged a load cheaper than waiting for a warm runner).

The marker is a ``loading.{token}.{num_ctx or 0}.{vendor pin or any}`` key in the ``{root}_models`` bucket, created
with a KV compare-and-set, so two registry copies (and any number of gateways) agree on one load
per model and context at a time. A marker is live while its agent is alive and either reports the
load under way or the marker is younger than ``load_grace_s`` (agent state lags the send), and
never longer than ``marker_ttl_s``; a stale marker is replaced by compare-and-set too. Every
`MARKER_CHECK_S` the registry deletes the markers it wrote whose load is done, has failed or is past
``marker_ttl_s`` (and every `MARKER_SWEEP_S` any such marker, a vanished registry's too) (`corral.routing.marker_expired`), each by compare-and-set on the revision it read,
so a newer marker is never removed: the bucket holds a marker per load under way, not one per
model and context ever asked for.

Replicas. Every `ReplicaSettings.check_s` the registry reads the overflow queue's depth per model.
A model whose queue, at the rate it drained since the last check, would take longer to empty than
a load of the model takes (the routing cost model's load time), or holds more than
``backlog_per_slot`` waiting requests per warm slot — for ``patience`` checks in a row, or at once
when nothing serves the model yet and its first load is under way (nothing drains that queue
before the load ends, and a replica started now is ready about when that load is) — is loaded on
as many more agents as the backlog needs — until there is a slot (counting loads already under
way) for every ``backlog_per_slot`` waiting requests — among those that have it on disk and room
for it in free VRAM, cheapest first (a preload: Ollama's empty generate). A burst on a cold model
thus starts one load from the requests themselves, and the registry adds the loads its queue
needs beside it: never a load per request, and no waiting for one load to end before the next
starts. Replicas that then sit idle are let go by Ollama's own ``keep_alive``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass

import msgspec
import nats.errors
from corral.protocol.errors import CorralError
from corral.protocol.messages import (
    AgentState,
    LoadMarker,
    PlaceReply,
    load_marker_decoder,
    place_request_decoder,
)
from corral.protocol.names import decode_token, parse_name
from corral.protocol.subjects import Subjects, usable_reply
from corral.routing import (
    DEFAULT_MODEL_SIZE,
    LOAD_BANDWIDTH,
    LOAD_MARKER_TTL_S,
    LOAD_OVERHEAD_S,
    Route,
    Router,
    fits,
    load_time,
    loading_for,
    marker_expired,
    warm,
)
from corral.runtime.fleet import FleetView
from corral.runtime.tasks import cancel_and_wait
from corral.runtime.workqueue import depths
from corral.transport import Transport, WorkRequest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

MARKER_CHECK_S = 1.0  # how often the registry deletes the load markers it wrote that did their work
MARKER_SWEEP_S = 60.0  # how often it looks at every marker (a registry that wrote some went away)
REPLICA_SETTLE_S = 10.0  # at most this long from a replica's load to its agent showing it warm
_enc = msgspec.json.Encoder()


MARKERS = "loading.>"  # every load marker's key


def marker_key(token: str, num_ctx: int | None, vendor: str | None = None) -> str:
    """One key per model, context and strict vendor pin (``any`` for requests any vendor may serve)."""
    return f"loading.{token}.{num_ctx or 0}.{vendor or 'any'}"


@dataclass(frozen=True)
class ReplicaSettings:
    check_s: float = 1.0  # how often queue depths are read; 0 = no demand-driven replicas
    patience: int = 2  # checks in a row a model's queue must drain too slowly before a replica loads
    backlog_per_slot: float = 2.0  # ... or hold more than this many waiting requests per warm slot


class Placer:
    # Seventeen attributes: what it works with (connection, subjects, fleet view, models bucket,
    # transport), its settings (replicas, grace, marker TTL, preload timeout), and three small
    # pieces of state that each belong to one job — load markers (the lock, the markers it wrote),
    # replicas (queue growth, preloads under way, agents being loaded) — plus a counter for logs
    # and the pinned models (kept up to date by `corral.registry.pins.PinKeeper`).
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        fleet: FleetView,
        models: KeyValue,
        transport: Transport,
        replicas: ReplicaSettings | None = None,
        *,
        load_grace_s: float = 1.0,
        preload_timeout_s: float = 3600.0,
        marker_ttl_s: float = LOAD_MARKER_TTL_S,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.fleet = fleet
        self.kv = models
        self.transport = transport
        self.replicas = replicas or ReplicaSettings()
        self.load_grace_s = load_grace_s
        self.marker_ttl_s = marker_ttl_s
        self.preload_timeout_s = preload_timeout_s  # a replica's load may take this long
        self._router = Router()
        self._lock = asyncio.Lock()
        self._written: dict[str, tuple[bytes, int]] = {}  # markers this registry wrote: value, revision
        self._growing: dict[str, tuple[int, int]] = {}  # token → (last depth, checks not shrinking)
        self._preloads: set[asyncio.Task[None]] = set()
        self._replicating: dict[str, set[str]] = {}  # token → agents this copy is loading it on
        self.loads_started = 0  # placements and replicas this copy started (for tests and logs)
        self.pinned: frozenset[str] = frozenset()  # models kept warm: a load evicting one ranks last

    # -- placement -------------------------------------------------------------------------------
    async def on_place(self, msg: Msg) -> None:
        if not usable_reply(msg.reply):
            return
        try:
            req = place_request_decoder.decode(msg.data)
            answer = await self.place(
                req.model,
                req.token,
                req.vendor,
                req.strict,
                req.num_ctx,
                exclude=frozenset(req.exclude),
                proposal=req.proposal,
            )
        except msgspec.DecodeError as e:
            log.warning("placement failed: %s", e)
            answer = PlaceReply()
        except nats.errors.Error as e:
            # the load markers could not be read or written: whether a load is under way is
            # unknown, so none is started on it; the asker waits for its proposal and asks again
            log.warning("placement of %s unknown: %s", req.model, e)
            answer = PlaceReply(agent=req.proposal, mine=False)
        with contextlib.suppress(nats.errors.Error):  # the asker is gone: nothing to answer
            await msg.respond(_enc.encode(answer))

    async def on_unplace(self, msg: Msg) -> None:
        """A gateway's load on ``proposal`` failed or never started: drop the marker naming it."""
        try:
            req = place_request_decoder.decode(msg.data)
            await self.unplace(req.token, req.num_ctx, req.vendor if req.strict else None, req.proposal)
        except (msgspec.DecodeError, nats.errors.Error) as e:
            log.warning("unplace failed: %s", e)
        if usable_reply(msg.reply):
            with contextlib.suppress(nats.errors.Error):  # the asker is gone: nothing to answer
                await msg.respond(b"")

    async def unplace(self, token: str, num_ctx: int | None, pin: str | None, agent: str) -> bool:
        """Delete the load marker for (model, context, pin) if it still names ``agent``."""
        key = marker_key(token, num_ctx, pin)
        async with self._lock:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                return False
            if not entry.value or load_marker_decoder.decode(entry.value).agent != agent:
                return False  # gone already, or a newer load elsewhere: not ours to drop
            try:
                await self.kv.delete(key, last=entry.revision)
            except BadRequestError:  # wrong last sequence: rewritten meanwhile
                return False
        log.info("load of %s (num_ctx %s) on %s failed: marker dropped", key, num_ctx or "default", agent)
        return True

    async def place(
        self,
        key: str,
        token: str,
        vendor: str | None,
        strict: bool,
        num_ctx: int | None,
        *,
        exclude: frozenset[str] = frozenset(),
        proposal: str = "",
    ) -> PlaceReply:
        route = Route(key=key, vendor=vendor, strict=strict, num_ctx=num_ctx)
        holders = [a for a in self._holders(route) if a.id not in exclude]
        if not holders:
            return PlaceReply()
        proposed = next((a for a in holders if a.id == proposal), None)
        if proposed is not None and warm(route, proposed):
            return PlaceReply(agent=proposed.id, mine=False)  # the asker's view was behind: wait for it
        # the asker judged a load cheaper than waiting: choose among the agents that need one
        holders = [a for a in holders if not warm(route, a)] or holders
        async with self._lock:  # one decision at a time in this copy; KV CAS across copies
            pin = vendor if strict else None
            live = await self._live_marker(token, num_ctx, pin)
            if live is not None and any(a.id == live for a in holders):  # never one the pin excludes
                return PlaceReply(agent=live, mine=False)
            ranked = self._router.rank("auto", route, holders, {}, self.pinned)
            if not ranked:
                return PlaceReply()
            choice = ranked[0].id
            won = await self._claim(token, num_ctx, choice, pin)
            if won is not None:
                return PlaceReply(agent=won, mine=False)
            self.loads_started += 1
            log.info("placing %s (num_ctx %s) on %s", key, num_ctx or "default", choice)
            return PlaceReply(agent=choice, mine=True)

    def _holders(self, route: Route) -> list[AgentState]:
        return [
            a
            for a in self.fleet.with_model(route.key)
            if a.status == "active" and (not route.strict or a.vendor == route.vendor)
        ]

    async def _live_marker(self, token: str, num_ctx: int | None, vendor: str | None = None) -> str | None:
        """The agent a live marker names, or None (no marker, or a stale one). A marker that cannot
        be read (a timeout, NATS away) raises: it is not known to be missing."""
        try:
            entry = await self.kv.get(marker_key(token, num_ctx, vendor))
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            m = load_marker_decoder.decode(entry.value)
        except msgspec.DecodeError:
            return None
        return None if self._expired(marker_key(token, num_ctx, vendor), entry.value) else m.agent

    async def _claim(
        self, token: str, num_ctx: int | None, agent: str, vendor: str | None = None
    ) -> str | None:
        """Write our marker by compare-and-set; None when ours won, else the winner's agent."""
        key = marker_key(token, num_ctx, vendor)
        value = _enc.encode(LoadMarker(agent=agent, at=time.time()))
        try:
            entry = await self.kv.get(key)
            revision: int | None = entry.revision
        except KeyNotFoundError:
            revision = None
        try:
            if revision is None:
                written = await self.kv.create(key, value)
            else:
                written = await self.kv.update(key, value, last=revision)
            self._written[key] = (value, written)
            return None
        except KeyWrongLastSequenceError:  # a sibling registry wrote first: its choice stands
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:  # and its load is over already
                return agent
            if entry.value:
                return load_marker_decoder.decode(entry.value).agent
            return agent

    # -- expiring markers --------------------------------------------------------------------------
    async def marker_loop(self) -> None:
        """Every `MARKER_CHECK_S`, the markers this registry wrote (no listing: it knows them);
        every `MARKER_SWEEP_S`, every marker in the bucket (those of a registry that went away)."""
        swept = time.monotonic()
        while True:
            await asyncio.sleep(MARKER_CHECK_S)  # a period, not a wait for an event
            try:
                if time.monotonic() - swept >= MARKER_SWEEP_S:
                    swept = time.monotonic()
                    await self.prune_markers()
                elif self._written:
                    await self.prune_markers(mine=True)
            except nats.errors.Error as e:  # NATS away for a moment: the next check reads again
                log.warning("load marker check failed: %s", e)

    async def prune_markers(self, *, mine: bool = False) -> int:
        """Delete every load marker that has done its work (`marker_expired`) — only those this
        registry wrote when ``mine`` (no listing), else all of them; how many were deleted."""
        if mine:
            return await self._prune([(k, v, r) for k, (v, r) in self._written.items()])
        return await self._prune(await self._markers())

    async def _markers(self) -> list[tuple[str, bytes, int]]:
        """(key, value, revision) of every load marker in the bucket now."""
        markers: list[tuple[str, bytes, int]] = []
        watcher = await self.kv.watch(MARKERS, ignore_deletes=True)  # the markers there now, then None
        try:
            while True:
                entry = await watcher.updates(timeout=MARKER_CHECK_S * 5)  # type: ignore[no-untyped-call]
                if entry is None:
                    break
                if entry.value and entry.revision is not None:
                    markers.append((entry.key, entry.value, entry.revision))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return markers

    async def _prune(self, markers: list[tuple[str, bytes, int]]) -> int:
        pruned = 0
        async with self._lock:  # not under a placement here that is replacing the same stale marker
            for key, value, revision in markers:
                if not self._expired(key, value):
                    continue
                if self._written.get(key, (b"", revision))[1] == revision:
                    self._written.pop(key, None)  # done with (deleted now, or replaced by a newer one)
                try:
                    await self.kv.delete(key, last=revision)
                except BadRequestError:  # wrong last sequence: a newer marker stands there now
                    continue
                pruned += 1
        if pruned:
            log.debug("%d load markers done: deleted", pruned)
        return pruned

    def _expired(self, key: str, value: bytes) -> bool:
        try:
            _, token, ctx, _pin = key.split(".")
            m = load_marker_decoder.decode(value)
            route = Route(key=decode_token(token), num_ctx=int(ctx) or None)
        except (ValueError, msgspec.DecodeError):  # not a marker this registry wrote: none to keep
            return True
        agent = self.fleet.get(m.agent)
        return marker_expired(
            route,
            agent,
            alive=agent is not None and self.fleet.alive(agent),
            age_s=time.time() - m.at,
            grace_s=self.load_grace_s,
            ttl_s=self.marker_ttl_s,
        )

    # -- demand-driven replicas --------------------------------------------------------------------
    async def replica_loop(self) -> None:
        if self.replicas.check_s <= 0:
            return
        while True:
            await asyncio.sleep(self.replicas.check_s)  # a period, not a wait for an event
            try:
                await self.check_replicas()
            except nats.errors.Error as e:  # NATS away for a moment: the next check reads again
                log.warning("replica check failed: %s", e)

    async def check_replicas(self) -> None:
        per_model: dict[str, int] = {}
        for subject, n in (await depths(self.nc.jetstream(), self.subjects)).items():
            token = subject.rsplit(".", 1)[-1]
            per_model[token] = per_model.get(token, 0) + n
        for token in list(self._growing):
            if token not in per_model:
                del self._growing[token]
        for token, depth in per_model.items():
            last, streak = self._growing.get(token, (0, 0))
            # how long the queue would take to drain at the rate it drained since the last check
            rate = (last - depth) / self.replicas.check_s if last > depth else 0.0
            drain_s = depth / rate if rate > 0 else math.inf
            key = decode_token(token)
            warm_slots = self._warm_slots(key)
            backlog = depth / max(warm_slots, 1)
            # a deep backlog is evidence enough at once while the first load runs (nothing drains
            # the queue before it ends), else on the second look; a slow drain must persist
            deep = backlog > self.replicas.backlog_per_slot
            streak = streak + 1 if deep or drain_s > self._load_time(key) else 0
            self._growing[token] = (depth, streak)
            if streak >= self.replicas.patience or (deep and (not warm_slots or last > 0)):
                if await self._add_replica(token, depth):
                    self._growing[token] = (depth, 0)

    def _warm_slots(self, key: str) -> int:
        route = Route(key=key)
        return sum(a.parallel for a in self._holders(route) if warm(route, a))

    def _load_time(self, key: str) -> float:
        """What a load of ``key`` costs by the routing cost model (on the first holder)."""
        route = Route(key=key)
        holders = self.fleet.with_model(key)
        return (
            load_time(route, holders[0]) if holders else LOAD_OVERHEAD_S + DEFAULT_MODEL_SIZE / LOAD_BANDWIDTH
        )

    async def _add_replica(self, token: str, depth: int) -> bool:
        """Load ``token``'s model on as many more agents as its backlog needs (at most
        ``backlog_per_slot`` waiting requests per slot, counting loads already under way)."""
        key = decode_token(token)
        route = Route(key=key)
        holders = self._holders(route)
        serving = [a for a in holders if warm(route, a)]
        starting = self._replicating.setdefault(token, set())
        loading = [a for a in holders if not warm(route, a) and (loading_for(route, a) or a.id in starting)]
        if not serving and not loading:
            return False  # no load under way yet: the first one is the placement's business
        spare = [a for a in holders if a not in serving and a not in loading and fits(route, a)]
        slots = sum(a.parallel for a in serving + loading)
        needed = depth / self.replicas.backlog_per_slot
        chosen: list[AgentState] = []
        for a in self._router.rank("auto", route, spare, {}, self.pinned):
            if slots >= needed:
                break
            chosen.append(a)
            slots += a.parallel
        for a in chosen:
            self.loads_started += 1
            starting.add(a.id)
            log.info("%d requests wait for %s: loading a replica on %s", depth, key, a.id)
            task = asyncio.create_task(self._preload(a.id, key, token))
            self._preloads.add(task)
            task.add_done_callback(self._preloads.discard)
        return bool(chosen)

    async def _preload(self, agent_id: str, key: str, token: str) -> None:
        name = parse_name(key)
        work = WorkRequest("/api/generate", _enc.encode({"model": key}), model=name)
        try:
            async with await self.transport.send_to(agent_id, work, timeout=self.preload_timeout_s) as reply:
                await reply.read()
            # it counts as loading here until the fleet shows it serving (the agent's state
            # follows the load by a refresh), lest the next check load it there again
            deadline = time.monotonic() + REPLICA_SETTLE_S
            while not self._serves(agent_id, key) and (left := deadline - time.monotonic()) > 0:
                await self.fleet.wait_changed(left)
        except (CorralError, nats.errors.Error) as e:
            log.warning("replica of %s on %s did not load: %s", key, agent_id, e)
        finally:
            self._replicating.get(token, set()).discard(agent_id)

    def _serves(self, agent_id: str, key: str) -> bool:
        agent = self.fleet.get(agent_id)
        return agent is not None and warm(Route(key=key), agent)

    async def stop(self) -> None:
        await cancel_and_wait(self._preloads)
