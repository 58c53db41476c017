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

Replicas: `corral.registry.replicas.Replicator`, which counts the loads this registry placed (and
still marks) as loads under way (`Placer.placing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

import msgspec
import nats.errors
from corral.protocol.messages import (
    AgentState,
    LoadMarker,
    PlaceReply,
    load_marker_decoder,
    place_request_decoder,
)
from corral.protocol.names import decode_token
from corral.protocol.subjects import Subjects, usable_reply
from corral.registry.replicas import ReplicaSettings, Replicator
from corral.routing import LOAD_MARKER_TTL_S, Demand, Route, Router, as_placed, marker_expired, warm
from corral.runtime.buckets import kv_create
from corral.runtime.fleet import FleetView
from corral.runtime.kvwatch import snapshot
from corral.transport import Transport
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

MARKER_CHECK_S = 1.0  # how often the registry deletes the load markers it wrote that did their work
MARKER_SWEEP_S = 60.0  # how often it looks at every marker (a registry that wrote some went away)
_enc = msgspec.json.Encoder()


MARKERS = "loading.>"  # every load marker's key


def marker_key(token: str, num_ctx: int | None, vendor: str | None = None) -> str:
    """One key per model, context and strict vendor pin (``any`` for requests any vendor may serve)."""
    return f"loading.{token}.{num_ctx or 0}.{vendor or 'any'}"


def marker_route(key: str) -> Route:
    """The model and context a `marker_key` is for; `ValueError` for a key that is not one."""
    _, token, ctx, _pin = key.split(".")
    return Route(key=decode_token(token), num_ctx=int(ctx) or None)


__all__ = ["MARKERS", "Placer", "ReplicaSettings", "marker_key"]  # ReplicaSettings: for the registry


class Placer:
    # Fourteen attributes: what it works with (connection, subjects, fleet view, models bucket,
    # transport), its settings (grace, marker TTL, preload timeout), the load markers' state (the
    # lock, the markers it wrote), the replicas' own `Replicator`, a counter for logs and the
    # pinned models (kept up to date by `corral.registry.pins.PinKeeper`).
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
        demand: Callable[[], Mapping[str, Demand]] = dict,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.fleet = fleet
        self.kv = models
        self.transport = transport
        self.load_grace_s = load_grace_s
        self.marker_ttl_s = marker_ttl_s
        self.preload_timeout_s = preload_timeout_s  # a replica's load may take this long
        self._router = Router()
        self._lock = asyncio.Lock()
        self._written: dict[str, tuple[bytes, int]] = {}  # markers this registry wrote: value, revision
        self.loads_started = 0  # placements this copy started (for tests and logs)
        self.pinned: frozenset[str] = frozenset()  # models kept warm: a load evicting one ranks last
        self.replicator = Replicator(
            nc,
            subjects,
            fleet,
            transport,
            replicas or ReplicaSettings(),
            pinned=lambda: self.pinned,
            placing=self.placing,
            demand=demand,
            preload_timeout_s=preload_timeout_s,
        )

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
            # the loads this copy placed moments ago count, though the agents do not show them yet
            ranked = self._router.rank("auto", route, self._as_placed(holders), {}, self.pinned)
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
                written = await kv_create(self.kv, key, value)
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
        return [
            (e.key, e.value, e.revision)
            for e in await snapshot(self.kv, MARKERS, timeout=MARKER_CHECK_S * 5)
            if e.value and e.revision is not None
        ]

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

    def _as_placed(self, holders: list[AgentState]) -> list[AgentState]:
        """``holders`` with the loads this copy placed on them (its markers) that their states do
        not show yet: they take memory and count among the models an agent's Ollama keeps."""
        placed: dict[str, list[Route]] = {}
        for key, (value, _) in self._written.items():
            placed.setdefault(load_marker_decoder.decode(value).agent, []).append(marker_route(key))
        return as_placed(holders, placed)

    def _expired(self, key: str, value: bytes) -> bool:
        try:
            route = marker_route(key)
            m = load_marker_decoder.decode(value)
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

    # -- demand-driven replicas (`corral.registry.replicas`) -----------------------------------------
    def placing(self, token: str) -> frozenset[str]:
        """Agents this copy placed a load of ``token`` on (any context or pin) whose marker it keeps."""
        prefix = f"loading.{token}."
        return frozenset(
            load_marker_decoder.decode(value).agent
            for key, (value, _) in self._written.items()
            if key.startswith(prefix)
        )

    async def replica_loop(self) -> None:
        await self.replicator.run()

    async def stop(self) -> None:
        await self.replicator.stop()
