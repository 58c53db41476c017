"""A loaded (or loading) model instance: its slots, FIFO slot wait and per-slot prompt cache,
and the eviction choice among runners (Ollama's server/sched.go)."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Sequence
from enum import Enum

from corral.simulator.catalog import LocalModel
from corral.simulator.placement import Placement, RunnerOptions


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists (binary search over C-speed slice compares)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class RunnerState(Enum):
    LOADING = "loading"
    READY = "ready"
    UNLOADED = "unloaded"


class Slot:
    __slots__ = ("busy", "cached", "index", "used")

    def __init__(self, index: int) -> None:
        self.index = index
        self.cached: list[int] = []
        self.busy = False
        self.used = 0  # tick of the last acquisition (for least-recently-used choice)


def choose_slot(free: Sequence[Slot], tokens: Sequence[int]) -> Slot:
    """llama-server's choice: the slot sharing the longest prefix with `tokens`, unless that covers
    less than half of the prompt — then the least recently used slot (keeping other caches warm)."""
    if len(free) == 1:
        return free[0]
    best = max(free, key=lambda s: common_prefix(s.cached, tokens))
    if tokens and common_prefix(best.cached, tokens) * 2 >= len(tokens):
        return best
    return min(free, key=lambda s: s.used)


class Runner:
    """One loaded (or loading) model instance.

    Its attributes mirror the fields of an Ollama runner (model, options, placement, keep_alive
    timer, slots and their waiters, load state) so the scheduler reads like Ollama's; the slot
    queue is the only part with rules of its own, and it is kept in `acquire`/`release`."""

    def __init__(
        self,
        model: LocalModel,
        options: RunnerOptions,
        num_parallel: int,
        placement: Placement,
        keep_alive: float,
    ) -> None:
        self.model = model
        self.key = model.key
        self.options = options
        self.num_parallel = num_parallel
        self.placement = placement
        self.keep_alive = keep_alive
        self.expires_at = math.inf
        self.refcount = 0
        self.active = 0  # requests in prompt eval or decode (they share bandwidth)
        self.state = RunnerState.LOADING
        self.evicting = False
        self.loaded_at = 0.0
        self.slots = [Slot(i) for i in range(num_parallel)]
        self._slot_waiters: deque[tuple[list[int], asyncio.Future[Slot]]] = deque()
        self._tick = 0
        self.loaded: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.unloaded = asyncio.Event()
        self.timer: asyncio.TimerHandle | asyncio.Handle | None = None

    @property
    def size(self) -> int:
        return self.placement.size

    @property
    def size_vram(self) -> int:
        return self.placement.size_vram

    @property
    def idle(self) -> bool:
        return self.refcount == 0

    def __repr__(self) -> str:
        return f"<Runner {self.key} {self.state.value} refs={self.refcount} ctx={self.options.num_ctx}>"

    # ---- slots -------------------------------------------------------------------------------

    async def acquire_slot(self, tokens: list[int]) -> Slot:
        """A free slot (the one with the longest cached prefix of `tokens`), else wait in FIFO order."""
        if not self._slot_waiters:
            free = [s for s in self.slots if not s.busy]
            if free:
                slot = choose_slot(free, tokens)
                slot.busy = True
                self._tick += 1
                slot.used = self._tick
                return slot
        fut: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        entry = (tokens, fut)
        self._slot_waiters.append(entry)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release_slot(fut.result())
            else:
                try:
                    self._slot_waiters.remove(entry)
                except ValueError:
                    pass
            raise

    def release_slot(self, slot: Slot) -> None:
        while self._slot_waiters:
            _, fut = self._slot_waiters.popleft()
            if not fut.done():
                self._tick += 1
                slot.used = self._tick
                fut.set_result(slot)
                return
        slot.busy = False

    @property
    def waiting(self) -> int:
        return len(self._slot_waiters)


def pick_victim(runners: Sequence[Runner]) -> Runner | None:
    """Ollama's eviction order: sort by keep_alive ascending (forever last), tie-break by name; first idle, else first."""
    candidates = [r for r in runners if r.state is RunnerState.READY and not r.evicting]
    if not candidates:
        candidates = [r for r in runners if r.state is RunnerState.READY]
    if not candidates:
        return None
    ordered = sorted(candidates, key=lambda r: (r.keep_alive, r.key))
    for r in ordered:
        if r.idle:
            return r
    return ordered[0]
