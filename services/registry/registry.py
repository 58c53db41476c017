"""The registry: fleet membership and fleet-wide model pulls.

Membership. Agents write their own state to the ``{root}_agents`` KV bucket (on change and on a
heartbeat) and delete it when they stop cleanly. The registry watches that bucket and

- announces ``joined`` on ``{root}.events.agent`` when an agent appears (or restarts);
- announces ``left`` when an agent deleted its own key;
- declares an agent ``dead`` when its state is older than ``dead_after_s`` (default: three of the
  agent's own heartbeats): it deletes the key *at the revision it judged* (``last=revision``), so a
  state written meanwhile wins and the agent stays. The gateway stops routing to the agent as soon
  as its key is gone (and already stops after three missed heartbeats by itself).

Several registries may run at once without double-acting: every announcement is made by whoever
wins a KV compare-and-set on a ``member.{id}`` marker in the views bucket, and the death delete is
a compare-and-set too.

Model index. Every copy keeps the ``model.{token}`` keys of the ``{root}_models`` bucket (which
agents have each model on disk and loaded) up to date; see `corral.registry.index`.

Pulls. ``{root}.registry.pull`` (queue group ``registry``, so one copy serves each pull) takes an
Ollama pull body plus ``replicas`` / ``vendor`` / ``all``, chooses the agents, runs ``/api/pull``
on each at once and answers with one merged NDJSON progress stream in the same reply framing agents
use (claim, head, data, end): per-layer lines whose ``total``/``completed`` sum over the agents,
``success`` only when every agent succeeded, an ``{"error": ...}`` line naming the agents that
failed otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple

import msgspec
import nats.errors
from corral.protocol.envelope import RequestEnvelope, decode_request
from corral.protocol.errors import BadEnvelope, BadRequest, CorralError
from corral.protocol.messages import AgentEvent, AgentState, agent_state_of
from corral.protocol.names import VENDORS, parse_name
from corral.protocol.subjects import Subjects
from corral.registry.index import ModelIndexWriter
from corral.registry.pins import PinKeeper
from corral.registry.placement import Placer, ReplicaSettings
from corral.registry.settings import RegistrySettings
from corral.routing import pull_order
from corral.runtime.fleet import SILENT_RESTART_S, STALE_HEARTBEATS, FleetView, received_at
from corral.runtime.nats import Buckets, NatsAuth, Reopener, connect, ensure_buckets, watch_until
from corral.runtime.tasks import cancel_and_wait, supervise
from corral.transport import Reply, Transport, WorkRequest, fan_out
from corral.transport.replies import ReplyWriter
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

QUEUE_GROUP = "registry"
NDJSON = "application/x-ndjson"
JSON = "application/json; charset=utf-8"
_enc = msgspec.json.Encoder()
_DEAD = b"dead"


class PullRequest(msgspec.Struct, kw_only=True):
    """What ``{root}.registry.pull`` takes: Ollama's pull body plus where to put the model."""

    model: str = ""
    name: str = ""  # older clients
    insecure: bool = False
    stream: bool | None = None
    replicas: int = 1  # how many agents should end up with it (ignored when ``all``)
    vendor: str | None = None  # only agents of this vendor
    all: bool = False  # every (matching) agent


class _Progress(msgspec.Struct, omit_defaults=True):
    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0


class _Line(msgspec.Struct):
    status: str = ""
    digest: str = ""
    total: int = 0
    completed: int = 0
    error: str = ""


_line = msgspec.json.Decoder(_Line)
_pull_request = msgspec.json.Decoder(PullRequest)


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
        self._pulls: set[asyncio.Task[None]] = set()
        self.placer: Placer | None = None
        self.pins: PinKeeper | None = None  # pinned models (16 attributes: each job's own state)
        self._index: ModelIndexWriter | None = None  # the model index in the models bucket
        self.lost = asyncio.Event()  # the NATS connection closed for good: the process must exit
        self._reopener: Reopener | None = None  # the buckets again after a NATS restart
        self._rewatch = asyncio.Event()  # the buckets were opened again: watch them anew

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
        )
        self._buckets = await ensure_buckets(
            self.nc.jetstream(), self.subjects, replicas=self.settings.js_replicas
        )
        self._reopener = Reopener(self.nc, self.subjects, self._reopened, replicas=self.settings.js_replicas)
        self._reopener.start()
        self._fleet = FleetView(self._buckets.agents)
        await self._fleet.start()
        self._transport = Transport(self.nc, self.subjects)
        await self._transport.start()
        self._spawn("registry watch", self._watch, "registry-watch")
        await asyncio.wait_for(self._synced.wait(), 10)
        self._index = ModelIndexWriter(self._buckets.agents, self._buckets.models)
        await self._index.start()
        self._spawn("registry reaper", self._reaper, "registry-reaper")
        await self.nc.subscribe(self.subjects.registry("pull"), queue=QUEUE_GROUP, cb=self._on_pull)
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
        )
        await self.nc.subscribe(self.subjects.registry("place"), queue=QUEUE_GROUP, cb=self.placer.on_place)
        await self.nc.subscribe(
            self.subjects.registry("unplace"), queue=QUEUE_GROUP, cb=self.placer.on_unplace
        )
        self._spawn("replica loop", self.placer.replica_loop, "registry-replicas")
        self._spawn("load markers", self.placer.marker_loop, "registry-markers")
        self.pins = PinKeeper(self.placer, self._buckets)
        self._spawn("pin keeper", self.pins.run, "registry-pins")
        log.info("registry ready: %d agents", len(self._known))

    def _spawn(self, what: str, run: Callable[[], Awaitable[None]], name: str) -> None:
        self._tasks.append(asyncio.create_task(supervise(what, run), name=name))

    async def stop(self) -> None:
        if self._reopener is not None:
            await self._reopener.stop()
        if self.placer is not None:
            await self.placer.stop()
        await cancel_and_wait([*self._tasks, *self._pulls])
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
        watcher = await self._buckets.agents.watchall()
        seen: set[str] | None = set()  # the snapshot's agents, until it ends
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=SILENT_RESTART_S)  # type: ignore[no-untyped-call]
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
        finally:
            with contextlib.suppress(nats.errors.Error):  # the connection is closing under us
                await watcher.stop()  # type: ignore[no-untyped-call]

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
                    await self._declare_dead(agent_id, known.revision)
                else:
                    wake = min(wake, late)
            await asyncio.sleep(max(wake, 0.05))  # the next deadline, not a poll

    async def _declare_dead(self, agent_id: str, revision: int) -> None:
        """Remove an agent that missed its heartbeats, and announce it. The ``dead`` marker goes
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
        log.warning("agent %s missed its heartbeats: removed from the fleet", agent_id)
        await self._announce("dead", agent_id)
        try:
            await self._buckets.views.delete(marker)
        except nats.errors.Error as e:  # left behind: the agent's next join rewrites it
            log.warning("cannot drop the membership marker of %s: %s", agent_id, e)

    async def _joined(self, state: AgentState) -> None:
        assert self._buckets is not None
        marker, value = _member_key(state.id), str(state.started_at).encode()
        try:
            await self._buckets.views.create(marker, value)
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

    # -- fleet-wide pull -----------------------------------------------------------------------
    async def _on_pull(self, msg: Msg) -> None:
        task = asyncio.create_task(self._serve_pull(msg))
        self._pulls.add(task)
        task.add_done_callback(self._pulls.discard)

    def targets(self, req: PullRequest) -> list[AgentState]:
        agents = pull_order(self.fleet.agents(), parse_name(req.model or req.name).key, req.vendor)
        return agents if req.all else agents[: max(req.replicas, 1)]

    async def _serve_pull(self, msg: Msg) -> None:
        assert self.nc is not None
        if not self.subjects.is_reply(msg.reply):
            return  # nowhere under the root to answer: a pull nobody can follow is not started
        try:
            env: RequestEnvelope | BadEnvelope = decode_request(msg.headers)
        except BadEnvelope as e:
            env = e
        out = ReplyWriter(self.nc, msg.reply, env.rid if isinstance(env, RequestEnvelope) else "", "registry")
        await out.claim()
        try:
            if isinstance(env, BadEnvelope):
                raise env
            req = _pull_request.decode(msg.data)
            if not (req.model or req.name):
                raise BadRequest("model is required")
            if req.vendor is not None and req.vendor not in VENDORS:
                raise BadRequest(f"unknown vendor {req.vendor!r}")
            targets = self.targets(req)
            if not targets:
                raise BadRequest(
                    "no agent can take this pull" + (f" (vendor {req.vendor})" if req.vendor else "")
                )
        except (CorralError, msgspec.DecodeError) as e:
            message = e.message if isinstance(e, CorralError) else str(e)
            status = e.status if isinstance(e, CorralError) else 400
            await out.head(status, JSON, _enc.encode({"error": message}), end=True)
            return
        stream = req.stream is not False
        if stream:
            await out.head(200, NDJSON)
        errors: list[str] = []
        # a pull is silent for long stretches (all of it, unstreamed): pings keep the gateway's
        # idle timeout from taking the registry for dead
        keepalive = asyncio.create_task(self._ping(out))
        try:
            async for line in self._merged(req, targets, errors):
                if stream:
                    await out.data(line)
        finally:
            await cancel_and_wait([keepalive])
        if stream:
            if errors:
                await out.data(_enc.encode({"error": "; ".join(errors)}) + b"\n")
            await out.end()
        elif errors:
            await out.head(500, JSON, _enc.encode({"error": "; ".join(errors)}), end=True)
        else:
            await out.head(200, JSON, _enc.encode(_Progress("success")), end=True)

    async def _ping(self, out: ReplyWriter) -> None:
        while True:
            await asyncio.sleep(self.settings.ping_interval_s)  # a period, not a wait for an event
            await out.ping()

    async def _merged(
        self, req: PullRequest, targets: list[AgentState], errors: list[str]
    ) -> AsyncIterator[bytes]:
        """Run the pull on every target and yield merged progress lines as they come."""
        transport = self._transport
        assert transport is not None
        body = _enc.encode({"model": req.model or req.name, "insecure": req.insecure, "stream": True})
        lines: asyncio.Queue[tuple[str, _Line] | None] = asyncio.Queue()

        async def relay(reply: Reply) -> None:
            if reply.status != 200:
                data = await reply.read()
                await lines.put((reply.agent, _Line(error=_error_text(data) or f"HTTP {reply.status}")))
                return
            async for raw in reply.lines():
                await lines.put((reply.agent, _line.decode(raw)))

        async def run_all() -> None:
            try:
                results = await fan_out(
                    targets,
                    lambda a: transport.send_to(
                        a.id, WorkRequest("/api/pull", body), timeout=self.settings.pull_timeout_s
                    ),
                    relay,
                    tolerate=(CorralError, msgspec.DecodeError),
                )
                for agent, result in zip(targets, results, strict=True):
                    if isinstance(result, Exception):
                        lines.put_nowait((agent.id, _Line(error=str(result))))
            finally:
                lines.put_nowait(None)  # the merge below ends, whatever ended the fan-out

        runner = asyncio.create_task(run_all())
        layers: dict[str, dict[str, tuple[int, int]]] = {}  # digest → agent → (total, completed)
        said: set[str] = set()
        succeeded: set[str] = set()
        try:
            yield _enc.encode(_Progress("pulling manifest")) + b"\n"
            said.add("pulling manifest")
            while (item := await lines.get()) is not None:
                agent_id, line = item
                if line.error:
                    errors.append(f"{agent_id}: {line.error}")
                elif line.status == "success":
                    succeeded.add(agent_id)
                elif line.digest:
                    per = layers.setdefault(line.digest, {})
                    per[agent_id] = (line.total, line.completed)
                    total = sum(t for t, _ in per.values())
                    done = sum(c for _, c in per.values())
                    yield _enc.encode(_Progress(line.status, line.digest, total, done)) + b"\n"
                elif line.status and line.status not in said:
                    said.add(line.status)
                    yield _enc.encode(_Progress(line.status)) + b"\n"
            await asyncio.wait([runner])  # it has put its last line: ending now
            if not runner.cancelled() and (failure := runner.exception()) is not None:
                log.error("pull fan-out of %s failed", req.model or req.name, exc_info=failure)
            missing = [
                a.id
                for a in targets
                if a.id not in succeeded and not any(e.startswith(a.id + ":") for e in errors)
            ]
            errors.extend(f"{a}: pull ended without success" for a in missing)
            if not errors:
                yield _enc.encode(_Progress("success")) + b"\n"
        finally:
            await cancel_and_wait([runner])


class _Known(NamedTuple):
    revision: int  # the KV revision of ``state``: the death delete is conditional on it
    state: AgentState
    heard: float  # when it arrived (monotonic; see `received_at`)


_member_key = "member.{}".format  # an agent's membership marker in the views bucket


def _error_text(data: bytes) -> str:
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode(errors="replace")
    return str(obj.get("error", "")) if isinstance(obj, dict) else ""
