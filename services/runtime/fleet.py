"""A live, in-memory view of the fleet, kept by a JetStream KV watch on the agents bucket.

The gateway (and the direct client) route from this cache: which agents are alive, which models
each has on disk and loaded, how busy each is. No NATS round trip per request. A model name without
a key (`corral.protocol.names.key_of`) is indexed under none: no request is routed to it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Iterable

import msgspec
import nats.errors
from corral.protocol.messages import AgentState, agent_state_of
from corral.protocol.names import key_of
from corral.runtime.kvwatch import watch_forever, watching
from corral.runtime.tasks import cancel_and_wait, supervise
from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

STALE_HEARTBEATS = 3.0  # an agent silent for this many heartbeats is treated as dead
# a holder silent for up to this many heartbeats still keeps its models from "not found": a
# request for a model only such agents hold waits for them (`FleetView.lately_silent_with`)
LATELY_SILENT_HEARTBEATS = 2 * STALE_HEARTBEATS
SILENT_RESTART_S = 15.0  # a watch that heard nothing this long (agents heartbeat) is opened again


def received_at(entry: KeyValue.Entry, *, snapshot: bool) -> float:
    """When, on this process's monotonic clock, ``entry``'s state was as good as heard.

    Liveness never compares an agent's own clock with ours: an update is as fresh as the moment it
    arrived. An entry of a watch's initial snapshot may be old, though: it is as old as the time the
    server stored it (the stream's timestamp, one clock for every reader), so a dead agent's last
    state is not taken for a fresh one by a process that starts after it died."""
    now = time.monotonic()
    created: object = entry.created  # nats-py types it int; it is the message's datetime
    if not snapshot or not isinstance(created, datetime.datetime):
        return now
    age = time.time() - created.timestamp()
    return now - max(age, 0.0)


class FleetView:
    # Thirteen attributes: the bucket, the agents with when each was heard (the only state) and the
    # two indexes over them, the change notifier and revision, the listeners for agents that leave,
    # the watch task with its sync and restart events, and when the watch last heard anything and
    # since when it cannot (`_now`).
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._agents: dict[str, AgentState] = {}
        self._heard: dict[str, float] = {}  # agent id → monotonic time its state arrived
        self._disk: dict[str, set[str]] = {}  # model key → agent ids with it on disk
        self._loaded: dict[str, set[str]] = {}  # model key → agent ids with it loaded
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._restart = asyncio.Event()
        self._gone_listeners: list[Callable[[str], object]] = []
        self.revision = 0
        self._last_heard = time.monotonic()  # the watch's latest entry (or snapshot's end)
        self._deaf_since: float | None = None  # the watch failed: silence since is not the agents'

    def on_gone(self, listener: Callable[[str], object]) -> None:
        """Call ``listener(agent_id)`` whenever an agent leaves this view: its key was deleted (it
        stopped, or a registry declared it dead) or a new snapshot lacks it and it went silent."""
        self._gone_listeners.append(listener)

    async def start(self, timeout: float = 10.0) -> None:
        self._task = asyncio.create_task(
            supervise("fleet watch", self._watch, wake=self._restart), name="fleet-watch"
        )
        await asyncio.wait_for(self._synced.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    def restart(self) -> None:
        """Open the watch again (after a reconnect: a restarted NATS may have a new bucket)."""
        self._restart.set()

    async def _watch(self) -> None:
        """Watch for ever: a new watch whenever one ends (silence) or `restart` is asked for; a
        watch that fails is raised to the supervisor, which logs it and backs off."""
        await watch_forever(self._watch_once, self._restart)

    async def _watch_once(self) -> None:
        """One watch: the snapshot (agents it lacks are gone), then updates until it is silent for
        `SILENT_RESTART_S` (agents heartbeat more often: a NATS restart may have replaced the
        bucket under it, and the watch would never hear of it)."""
        try:
            await self._watch_entries()
        except Exception:
            if self._deaf_since is None:
                log.warning("the fleet watch fails: agents' silence from now on is not counted")
                self._deaf_since = self._last_heard
                self._notify()  # liveness changed: waiters look again
            raise

    async def _watch_entries(self) -> None:
        seen: set[str] | None = set()  # the agents of the snapshot, until it ends
        async with watching(self._kv) as watcher:
            while True:
                try:
                    entry = await watcher.updates(timeout=SILENT_RESTART_S)
                except nats.errors.TimeoutError:
                    return
                self._last_heard = time.monotonic()
                if entry is None:  # end of the initial snapshot
                    self._hears_again()
                    self._forget_missing(seen or set())
                    seen = None
                    self._synced.set()
                    self._notify()
                    continue
                if seen is not None:
                    seen.add(entry.key)
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self._gone(entry.key)
                else:
                    try:
                        self._put(agent_state_of(entry.key, entry.value))
                    except msgspec.DecodeError as e:
                        log.warning("ignoring agent state for %s: %s", entry.key, e)
                        continue
                    self._heard[entry.key] = received_at(entry, snapshot=seen is not None)
                self._notify()

    def connection_lost(self) -> None:
        """Its NATS connection is down (`corral.runtime.nats.connect`'s ``on_disconnected``): from
        now until the watch hears again, agents' silence is not counted (`_now`). The watch itself
        notices only when it has heard nothing for `SILENT_RESTART_S`, by when every agent would
        have gone stale and the views shown an empty fleet."""
        if self._deaf_since is None:
            log.info("fleet view: NATS is away: agents' silence from now on is not counted")
            self._deaf_since = time.monotonic()
            self._notify()

    def _hears_again(self) -> None:
        """The watch hears again after failing (`_now`): the silence it could not hear is nobody's,
        so an agent not heard since it went deaf is as silent now as it was then (its state in the
        snapshot is as old as the outage: agents could not write it)."""
        if self._deaf_since is None:
            return
        deaf_for = time.monotonic() - self._deaf_since
        for agent_id, heard in self._heard.items():
            if heard <= self._deaf_since:
                self._heard[agent_id] = heard + deaf_for
        self._deaf_since = None

    def _forget_missing(self, seen: set[str]) -> None:
        """After a snapshot: agents it lacks are gone — unless heard within their liveness window.
        A watch opened again while a NATS cluster elects a new leader (or on a bucket a restarted
        server is refilling) can see an empty or partial snapshot; dropping live agents on it would
        answer "model not found" until their next heartbeats. Those kept age out like any agent
        that stops heartbeating, and a deletion the watch does see removes at once. A silent one
        is not kept even within `lately_silent_with`'s window: a registry may have removed it
        while the watch was closed, and only this ends the calls it holds."""
        now = time.monotonic()
        for agent_id in set(self._agents) - seen:
            if not self.alive(self._agents[agent_id], now):
                self._gone(agent_id)

    def _put(self, state: AgentState) -> None:
        self._remove(state.id)
        self._agents[state.id] = state
        for key in _keys(m.name for m in state.models):
            self._disk.setdefault(key, set()).add(state.id)
        for key in _keys(m.name for m in state.loaded):
            self._loaded.setdefault(key, set()).add(state.id)

    def _gone(self, agent_id: str) -> None:
        known = agent_id in self._agents
        self._remove(agent_id)
        if known:
            for listener in self._gone_listeners:
                listener(agent_id)

    def _remove(self, agent_id: str) -> None:
        self._heard.pop(agent_id, None)
        old = self._agents.pop(agent_id, None)
        if old is None:
            return
        for index in (self._disk, self._loaded):
            for key in list(index):
                index[key].discard(agent_id)
                if not index[key]:
                    del index[key]

    def _notify(self) -> None:
        self.revision += 1
        fut, self._changed = self._changed, asyncio.get_running_loop().create_future()
        fut.set_result(None)

    async def wait_changed(self, timeout: float) -> bool:
        """Wait for the next change to any agent's state; False on timeout."""
        done, _ = await asyncio.wait((self._changed,), timeout=timeout)  # never cancels the future
        return bool(done)

    # -- queries (all O(agents holding the model), never O(fleet)) -----------------------------
    def _now(self, now: float | None) -> float:
        """The clock agents' silence is counted by: ``now`` (monotonic), stopped while the watch
        fails (JetStream without a quorum, a cluster electing a leader): agents cannot write their
        state then, nor could it be heard, and the claims they hold on core NATS still serve; so
        none of them turns dead, or its models "not found", for a silence nobody could hear."""
        now = time.monotonic() if now is None else now
        return now if self._deaf_since is None else min(now, self._deaf_since)

    @property
    def deaf(self) -> bool:
        """Whether the watch fails now (`_now`)."""
        return self._deaf_since is not None

    def alive(self, state: AgentState, now: float | None = None) -> bool:
        """Whether ``state``'s agent was heard within its last `STALE_HEARTBEATS` heartbeats, by
        this process's monotonic clock (``now``; `_now`), never by the agent's own."""
        heard = self._heard.get(state.id)
        return heard is not None and self._now(now) - heard <= STALE_HEARTBEATS * state.heartbeat_s

    def heard(self, agent_id: str) -> float | None:
        """When (monotonic) the current state of ``agent_id`` arrived."""
        return self._heard.get(agent_id)

    def agents(self) -> list[AgentState]:
        now = time.monotonic()
        return [a for a in self._agents.values() if self.alive(a, now)]

    def get(self, agent_id: str) -> AgentState | None:
        return self._agents.get(agent_id)

    def knows(self, agent_id: str) -> bool:
        """Whether ``agent_id`` is an agent of this fleet (its state is in the agents bucket)."""
        return agent_id in self._agents

    def with_model(self, key: str) -> list[AgentState]:
        now = time.monotonic()
        return [a for i in self._disk.get(key, ()) if (a := self._agents[i]) and self.alive(a, now)]

    def lately_silent_with(self, key: str) -> list[AgentState]:
        """Agents with ``key`` on disk that went silent only lately: past their liveness window
        (`alive`) by no more than that window again (`LATELY_SILENT_HEARTBEATS` in all). Such an
        agent is as likely slow (a loaded host, a NATS leader election) or restarting as gone, so
        its models are not "not found" yet; a registry removes one that stays silent."""
        now = time.monotonic()
        agents = (self._agents[i] for i in self._disk.get(key, ()))
        return [a for a in agents if not self.alive(a, now) and self._heard_lately(a, now)]

    def _heard_lately(self, state: AgentState, now: float) -> bool:
        """``state``'s agent was heard within `LATELY_SILENT_HEARTBEATS` of its heartbeats."""
        heard = self._heard.get(state.id)
        return heard is not None and self._now(now) - heard <= LATELY_SILENT_HEARTBEATS * state.heartbeat_s

    def has_model(self, key: str) -> bool:
        """Whether a live agent has ``key`` on disk: O(1) while its first holder is alive, where
        `with_model` lists them all."""
        now = time.monotonic()
        return any(self.alive(self._agents[i], now) for i in self._disk.get(key, ()))

    def loaded_on(self, key: str) -> list[AgentState]:
        now = time.monotonic()
        return [a for i in self._loaded.get(key, ()) if (a := self._agents[i]) and self.alive(a, now)]

    def is_loaded(self, agent_id: str, key: str) -> bool:
        return agent_id in self._loaded.get(key, ())


def _keys(names: Iterable[str]) -> list[str]:
    """The keys of ``names``; a name without one (not a valid Ollama name) is left out."""
    return [k for n in names if (k := key_of(n)) is not None]


class IdInUse(RuntimeError):
    """A process was to join the fleet under an id a live member of another host or backend holds:
    both would take each other's direct requests and overwrite each other's state."""


FRESH_HEARTBEATS = 3  # a state younger than this many heartbeats is a live member's


def id_clash(held: AgentState | None, me: AgentState, age_s: float, heartbeat_s: float) -> str | None:
    """Why ``me`` may not join under its id while ``held`` is the state stored there, ``age_s``
    seconds ago (None: it may). A state stored within `FRESH_HEARTBEATS` heartbeats from another
    host or another Ollama is a live agent elsewhere (an id given twice, a configuration copied to
    a second host); one from this host and Ollama is this agent's own, restarted (as a supervisor
    restarts it), and an older one is a member gone."""
    if held is None or age_s >= FRESH_HEARTBEATS * heartbeat_s:
        return None
    if held.host == me.host and held.ollama_url == me.ollama_url:
        return None
    return (
        f"agent id {me.id!r} is in use by a live agent on {held.host} (Ollama {held.ollama_url}, heard "
        f"{max(age_s, 0.0):.0f}s ago): give this one another id (--id, CORRAL_ID)"
    )


async def refuse_taken_id(agents: KeyValue, me: AgentState, heartbeat_s: float) -> None:
    """Raise `IdInUse` when `id_clash` says so of the state stored under ``me``'s id, as old as the
    server's timestamp of it says (never the peer's own clock); an entry that cannot be read or
    decoded says nothing."""
    try:
        entry = (await agents.history(me.id))[-1]  # a get leaves out the server's timestamp; this has it
        held = agent_state_of(me.id, entry.value) if entry.value and entry.operation is None else None
    except (nats.errors.Error, msgspec.DecodeError, msgspec.ValidationError, TimeoutError, IndexError):
        return  # none there (NoKeysError), or not readable: nothing to say
    created: object = entry.created  # nats-py types it int; it is the message's datetime
    if not isinstance(created, datetime.datetime):
        return
    age_s = time.time() - created.timestamp()
    if (why := id_clash(held, me, age_s, heartbeat_s)) is not None:
        raise IdInUse(why)
    if held is None or held.started_at == me.started_at or age_s >= FRESH_HEARTBEATS * heartbeat_s:
        return
    # from this host and Ollama, and fresh: this agent's own, left by a run that crashed (a clean
    # stop deletes it), or the same agent still running (started twice), which writes again within
    # a heartbeat of its last write
    wait_s = AGAIN_HEARTBEATS * held.heartbeat_s - max(age_s, 0.0)
    if wait_s > 0 and (again := await _written_again(agents, me.id, entry.revision or 0, wait_s)):
        raise IdInUse(
            f"agent id {me.id!r} is in use by a live agent process on this host and Ollama ({again.host}, "
            f"{again.ollama_url}): the same agent started twice? give this one another id (--id, CORRAL_ID)"
        )


AGAIN_HEARTBEATS = 1.5  # a live agent writes its state at least once a heartbeat (and on changes)


async def _written_again(
    agents: KeyValue, agent_id: str, revision: int, within_s: float
) -> AgentState | None:
    """The state written under ``agent_id`` after ``revision`` within ``within_s`` seconds, if any."""
    deadline = time.monotonic() + within_s
    async with watching(agents, agent_id) as watcher:
        while (left := deadline - time.monotonic()) > 0:
            try:
                entry = await watcher.updates(timeout=left)
            except nats.errors.TimeoutError:
                return None
            if entry is None or (entry.revision or 0) <= revision:
                continue  # the snapshot: what was read already
            if entry.operation is not None or not entry.value:
                return None  # deleted: it stopped
            try:
                return agent_state_of(agent_id, entry.value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return None
    return None


def displaced_by(held: AgentState | None, started_at: float) -> str | None:
    """Why an agent process started at ``started_at`` must give up its id, finding ``held`` stored
    under it where its own last write should be (None: it keeps it). Another process's state that
    started earlier is a member that was there first, so this process is the duplicate (the same id
    given twice, a host cloned with its configuration); one that started later is the duplicate
    itself, and gives way at its own next write."""
    if held is None or held.started_at >= started_at:
        return None
    return (
        f"agent id {held.id!r} is in use by another agent process on {held.host} (Ollama "
        f"{held.ollama_url}), which started {started_at - held.started_at:.0f}s before this one: this "
        "one stops; give it another id (--id, CORRAL_ID)"
    )


class OwnState:
    """An agent's state under its id in the agents bucket, written only while the key is this
    process's: each write expects the revision of its last one. A write that finds another in
    between reads it (`displaced_by`); when this process is the duplicate, ``on_displaced`` is told
    why, once, and it writes nothing more, nor deletes the key at its stop. A key deleted meanwhile
    (the registry took this agent for dead) or a write of its own whose answer was lost is written
    over."""

    def __init__(
        self, agents: KeyValue, agent_id: str, started_at: float, on_displaced: Callable[[str], None]
    ) -> None:
        self.agents = agents
        self._id, self._started_at, self._on_displaced = agent_id, started_at, on_displaced
        self._revision = 0  # of its last write: 0 before the first, which is a plain put
        self.displaced = False

    async def put(self, value: bytes) -> None:
        """Write ``value``; raises what the bucket raises (NATS errors, timeouts)."""
        if self.displaced:
            return
        if self._revision:
            try:
                self._revision = await self.agents.update(self._id, value, last=self._revision)
                return
            except KeyWrongLastSequenceError:
                held = await self._held()
                # a write after its own last (a lagging replica may still answer with an older one)
                later = held[1] if held is not None and held[0] > self._revision else None
                if (why := displaced_by(later, self._started_at)) is not None:
                    self.displaced = True
                    self._on_displaced(why)
                    return
        self._revision = await self.agents.put(self._id, value)

    async def _held(self) -> tuple[int, AgentState] | None:
        """The revision and state stored under the id; None when deleted or not an agent's state."""
        try:
            entry = await self.agents.get(self._id)
            return (entry.revision or 0, agent_state_of(self._id, entry.value)) if entry.value else None
        except (NotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def delete(self) -> None:
        """Remove the state (a clean stop), unless another process wrote it since this one's last
        write: a displaced agent leaves the key to the one it gave way to."""
        if self.displaced:
            return
        if self._revision:
            try:
                await self.agents.delete(self._id, last=self._revision)
                return
            except APIError as e:
                if e.err_code not in _WRONG_LAST:
                    raise
        held = await self._held()  # no write of its own answered, or one whose answer was lost
        if held is not None and held[1].started_at == self._started_at:
            await self.agents.delete(self._id, last=held[0])
        else:
            log.info("agent %s: the state stored under its id is not its own: left in place", self._id)


_WRONG_LAST = (10071, 10164)  # JetStream's "wrong last sequence" error codes
