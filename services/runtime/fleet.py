"""A live, in-memory view of the fleet, kept by a JetStream KV watch on the agents bucket.

The gateway (and the direct client) route from this cache: which agents are alive, which models
each has on disk and loaded, how busy each is. No NATS round trip per request. A model name without
a key (`corral.protocol.names.key_of`) is indexed under none: no request is routed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

import msgspec
import nats.errors
from corral.protocol.messages import AgentState, agent_state_decoder
from corral.protocol.names import key_of
from corral.runtime.tasks import cancel_and_wait
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

STALE_HEARTBEATS = 3.0  # an agent silent for this many heartbeats is treated as dead


class FleetView:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._agents: dict[str, AgentState] = {}
        self._disk: dict[str, set[str]] = {}  # model key → agent ids with it on disk
        self._loaded: dict[str, set[str]] = {}  # model key → agent ids with it loaded
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self.revision = 0

    async def start(self, timeout: float = 10.0) -> None:
        watcher = await self._kv.watchall()
        self._task = asyncio.create_task(self._watch(watcher), name="fleet-watch")
        await asyncio.wait_for(self._synced.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:  # end of the initial snapshot
                    self._synced.set()
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self._remove(entry.key)
                else:
                    try:
                        self._put(agent_state_decoder.decode(entry.value))
                    except msgspec.DecodeError:
                        log.warning("ignoring undecodable agent state for %s", entry.key)
                self._notify()
        finally:
            with contextlib.suppress(nats.errors.Error):  # the connection is closing under us
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _put(self, state: AgentState) -> None:
        self._remove(state.id)
        self._agents[state.id] = state
        for key in _keys(m.name for m in state.models):
            self._disk.setdefault(key, set()).add(state.id)
        for key in _keys(m.name for m in state.loaded):
            self._loaded.setdefault(key, set()).add(state.id)

    def _remove(self, agent_id: str) -> None:
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
    def alive(self, state: AgentState, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return now - state.updated_at <= STALE_HEARTBEATS * state.heartbeat_s

    def agents(self) -> list[AgentState]:
        now = time.time()
        return [a for a in self._agents.values() if self.alive(a, now)]

    def get(self, agent_id: str) -> AgentState | None:
        return self._agents.get(agent_id)

    def with_model(self, key: str) -> list[AgentState]:
        now = time.time()
        return [a for i in self._disk.get(key, ()) if (a := self._agents[i]) and self.alive(a, now)]

    def loaded_on(self, key: str) -> list[AgentState]:
        now = time.time()
        return [a for i in self._loaded.get(key, ()) if (a := self._agents[i]) and self.alive(a, now)]

    def is_loaded(self, agent_id: str, key: str) -> bool:
        return agent_id in self._loaded.get(key, ())


def _keys(names: Iterable[str]) -> list[str]:
    """The keys of ``names``; a name without one (not a valid Ollama name) is left out."""
    return [k for n in names if (k := key_of(n)) is not None]
