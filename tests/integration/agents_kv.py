"""Watching the agents bucket from a test: which agents are in the fleet, and waits (bounded) for
one to join or leave."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType

import nats
from corral.protocol.messages import AgentState, agent_state_decoder
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import ensure_buckets

from tests.integration.waits import Changes, until


class AgentsWatch:
    """``async with AgentsWatch(url, root) as fleet``: ``fleet.agents`` is the agents bucket as
    it is now; `until` waits for a condition on it."""

    def __init__(self, nats_url: str, root: str) -> None:
        self.nats_url = nats_url
        self.root = root
        self.agents: dict[str, AgentState] = {}
        self.history: list[tuple[str, str]] = []  # (agent id, "put" | "del"), in order
        self._changed = Changes()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AgentsWatch:
        self.nc = await nats.connect(self.nats_url)
        subjects = Subjects(self.root)
        buckets = await ensure_buckets(self.nc.jetstream(), subjects)
        self._watcher = await buckets.agents.watchall()
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._watcher.stop()
        await self.nc.close()

    async def _follow(self) -> None:
        while True:
            entry = await self._watcher.updates(timeout=3600)
            if entry is None:
                continue  # the end of the initial values
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self.agents.pop(entry.key, None)
                self.history.append((entry.key, "del"))
            else:
                self.agents[entry.key] = agent_state_decoder.decode(entry.value)
                self.history.append((entry.key, "put"))
            self._changed.set()

    async def until(
        self, what: str, predicate: Callable[[dict[str, AgentState]], bool], timeout: float
    ) -> None:
        """Wait until ``predicate(self.agents)`` holds; fail naming ``what`` after ``timeout`` s."""
        await until(
            lambda: predicate(self.agents),
            self._changed.wait,
            timeout=timeout,
            what=what,
            state=lambda: sorted(self.agents),
        )
