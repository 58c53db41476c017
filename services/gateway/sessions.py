"""Which agent served a conversation last: its prompt cache is there.

A gateway keeps the answers it has seen in a bounded in-memory map and writes each new or changed
one to the ``{root}_sessions`` KV bucket (keys expire with the bucket's TTL), so a conversation
whose turns arrive through different gateways still finds its agent: a follow-up turn the local map
does not know is looked up in KV once. Writes never sit on the request path (a background task each,
bounded in number); a lost write only costs one turn its cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import nats.errors
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

MAX_LOCAL = 100_000  # sessions remembered per gateway (least recently used forgotten first)
MAX_PENDING_WRITES = 1_000  # beyond this, writes are dropped rather than queued without bound


class Sessions:
    def __init__(self, kv: KeyValue | None, *, max_local: int = MAX_LOCAL) -> None:
        self._kv = kv
        self._local: OrderedDict[str, str] = OrderedDict()
        self._max = max_local
        self._writes: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._local)

    async def lookup(self, key: str) -> str | None:
        """The agent that served ``key`` last, from memory or else from KV; None if unknown."""
        agent = self._local.get(key)
        if agent is not None:
            self._local.move_to_end(key)
            return agent
        if self._kv is None:
            return None
        try:
            entry = await self._kv.get(key)
        except nats.errors.Error:  # not found, or KV unreachable: either way no affinity for this turn
            return None
        if not entry.value:
            return None
        agent = entry.value.decode()
        self._store(key, agent)
        return agent

    def remember(self, key: str, agent: str) -> None:
        """Record that ``agent`` served ``key``; written through to KV when it changed."""
        if not agent or self._local.get(key) == agent:
            if agent:
                self._local.move_to_end(key)
            return
        self._store(key, agent)
        if self._kv is not None and len(self._writes) < MAX_PENDING_WRITES:
            task = asyncio.create_task(self._write(key, agent))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    def _store(self, key: str, agent: str) -> None:
        self._local[key] = agent
        self._local.move_to_end(key)
        while len(self._local) > self._max:
            self._local.popitem(last=False)

    async def _write(self, key: str, agent: str) -> None:
        assert self._kv is not None
        try:
            await self._kv.put(key, agent.encode())
        except nats.errors.Error as e:
            log.debug("session %s not written: %s", key, e)

    async def close(self) -> None:
        """Let pending writes finish (they are short)."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=2.0)
