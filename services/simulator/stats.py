"""Counters a test or benchmark can read (`sim.stats`) and wait on (`await sim.stats.wait_for(...)`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ModelStats:
    started: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    loads: int = 0
    loads_completed: int = 0
    partial_loads: int = 0
    load_aborts: int = 0
    reloads: int = 0


@dataclass
class SimStats:
    """Counters the simulator exposes; its attributes are the JSON fields of its stats endpoint."""

    started: int = 0
    finished: int = 0
    cancelled: int = 0  # client went away while waiting for a load/slot or while streaming
    failed: int = 0  # scheduling errors (busy, load failure)
    busy_rejections: int = 0  # 503 "server busy"
    unsupported: int = 0  # 400 "... does not support generate" (chat, insert, tools, thinking)
    loads: int = 0  # loads begun
    loads_completed: int = 0
    partial_loads: int = 0  # loads begun partly in system RAM (size_vram < size): slower decode
    load_aborts: int = 0  # triggering client disconnected during the load
    unloads: int = 0
    reloads: int = 0  # runner replaced because runner options changed
    evictions: int = 0  # runner unloaded to make room
    expirations: int = 0  # keep_alive timer fired
    prompt_tokens: int = 0  # prompt tokens reported (prompt_eval_count)
    prompt_tokens_evaluated: int = 0  # actually processed
    prompt_tokens_cached: int = 0  # served from a slot's prompt cache
    generated_tokens: int = 0
    pulls: int = 0  # /api/pull requests (with a valid name), whether or not the registry has it
    pulls_ended: int = 0  # of those, ended: done, failed, or cut off by their client
    pulls_cut: int = 0  # of those, cut off by their client before the end
    per_model: dict[str, ModelStats] = field(default_factory=dict)
    _waiters: list[tuple[Callable[[SimStats], bool], asyncio.Future[None]]] = field(
        default_factory=list, repr=False
    )

    def model(self, key: str) -> ModelStats:
        m = self.per_model.get(key)
        if m is None:
            m = self.per_model[key] = ModelStats()
        return m

    def bump(self, name: str, n: int = 1, model: str | None = None) -> None:
        """Add `n` to counter `name` (and to the per-model counter of that name, if given)."""
        setattr(self, name, getattr(self, name) + n)
        if model is not None:
            m = self.model(model)
            setattr(m, name, getattr(m, name) + n)
        if self._waiters:
            self._check()

    def _check(self) -> None:
        keep = []
        for pred, fut in self._waiters:
            if fut.done():
                continue
            if pred(self):
                fut.set_result(None)
            else:
                keep.append((pred, fut))
        self._waiters = keep

    async def wait_for(self, predicate: Callable[[SimStats], bool], timeout: float = 5.0) -> None:
        """Return once `predicate(stats)` holds; `TimeoutError` after `timeout` seconds."""
        if predicate(self):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, fut))
        await asyncio.wait_for(fut, timeout)
