"""Ollama's scheduler (server/sched.go in github.com/ollama/ollama): runners on GPUs, one FIFO loader, eviction, slots, keep_alive.

Admission: a request for a loaded runner whose runner options match attaches at once
(refcount + 1, idle timer cancelled, keep_alive applied); one for a runner that is still loading
waits for that load. Everything else goes to a bounded pending queue (full → 503 "server busy")
that a single loop drains one request at a time: reload if the runner options changed, evict
(keep_alive ascending, idle first, not LRU) until the model fits (≤ 80 % of free VRAM
when others are loaded; the only model may partially offload), then load — a load the triggering
client abandons is aborted. Unloaded memory comes back after a release delay; after an eviction the
loader waits for that memory to come back (at most `VRAM_RECOVERY_S`, as Ollama's
`waitForVRAMRecovery` does) before it places the next model, so a model that fits once the victim is
gone loads entirely in VRAM instead of spilling into system RAM.

Each runner has `num_parallel` slots handed out in FIFO order; each slot remembers the tokens it
last processed (the prompt cache). The idle timer starts when the last request detaches.

The pure parts live in `placement` (`estimate`, `fit`, `needs_reload`) and `runner`
(`pick_victim`, `common_prefix`, `choose_slot`); they are re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from corral.protocol.errors import CorralError, InternalError, NoCapacity
from corral.simulator.catalog import LocalModel
from corral.simulator.clock import Clock
from corral.simulator.config import GB, GIB, SimConfig
from corral.simulator.durations import parse_server_keep_alive
from corral.simulator.placement import Placement, RunnerOptions, estimate, fit, needs_reload
from corral.simulator.runner import (
    Runner,
    RunnerState,
    Slot,
    choose_slot,
    common_prefix,
    pick_victim,
)
from corral.simulator.stats import SimStats

__all__ = [
    "Placement",
    "Runner",
    "RunnerOptions",
    "RunnerState",
    "Scheduler",
    "Slot",
    "choose_slot",
    "common_prefix",
    "estimate",
    "fit",
    "needs_reload",
    "pick_victim",
]

log = logging.getLogger(__name__)

VRAM_RECOVERY_S = 5.0  # simulated seconds the loader waits for an evicted runner's VRAM


class _Pending:
    __slots__ = ("future", "keep_alive", "load_task", "model", "options")

    def __init__(self, model: LocalModel, options: RunnerOptions, keep_alive: float | None) -> None:
        self.model = model
        self.options = options
        self.keep_alive = keep_alive
        self.future: asyncio.Future[Runner] = asyncio.get_running_loop().create_future()
        self.load_task: asyncio.Task[None] | None = None


class Scheduler:
    """The simulated GPU box's scheduler; one per `SimServer`.

    Its attributes are the box's memory ledger (VRAM per GPU: total, used, being released; RAM)
    and Ollama's loader (the pending FIFO, the runner loading now, the runners): one ledger that
    must change together under one loop, as Ollama's scheduler keeps it."""

    def __init__(self, config: SimConfig, clock: Clock, stats: SimStats) -> None:
        self.config = config
        self.clock = clock
        self.stats = stats
        self.default_keep_alive = parse_server_keep_alive(config.keep_alive)
        self.runners: dict[str, Runner] = {}
        cpu = config.vendor == "cpu"
        self.vram_total: list[int] = [] if cpu else [int(g.vram_gb * GIB) for g in config.gpus]
        self.vram_used: list[int] = [0] * len(self.vram_total)
        self.vram_releasing: list[int] = [0] * len(self.vram_total)
        self.ram_total = int(config.ram_gb * GB)
        self.ram_used = 0
        self.overhead = int(config.gpu_overhead_gb * GB)
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._released = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.loading: Runner | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(InternalError("server shutting down"))
        for r in list(self.runners.values()):
            if r.timer is not None:
                r.timer.cancel()
            self._unload(r, release_delay=False)

    # ---- admission ----------------------------------------------------------------------------

    def num_parallel_for(self, model: LocalModel) -> int:
        if model.config.is_embedding:
            return 1
        return model.config.num_parallel or self.config.num_parallel

    async def acquire(self, model: LocalModel, options: RunnerOptions, keep_alive: float | None) -> Runner:
        """A runner for `model` with `options`, attached (refcount held): call `release` after."""
        while True:
            r = self.runners.get(model.key)
            if r is not None and not r.evicting and not needs_reload(r.options, options):
                if r.state is RunnerState.READY:
                    self._attach(r, keep_alive)
                    return r
                if r.state is RunnerState.LOADING:
                    await asyncio.shield(r.loaded)
                    continue  # loaded (attach next round) or aborted (queue next round)
            if len(self._pending) >= self.config.max_queue:
                self.stats.bump("busy_rejections")
                raise NoCapacity()
            p = _Pending(model, options, keep_alive)
            self._pending.append(p)
            self._wake.set()
            try:
                return await p.future
            except asyncio.CancelledError:
                if p.load_task is not None:
                    p.load_task.cancel()
                if p.future.done() and not p.future.cancelled() and p.future.exception() is None:
                    self.release(p.future.result())
                raise

    def _attach(self, r: Runner, keep_alive: float | None) -> None:
        r.refcount += 1
        if r.timer is not None:
            r.timer.cancel()
            r.timer = None
        if keep_alive is not None:
            r.keep_alive = keep_alive

    def release(self, r: Runner) -> None:
        """Detach one request; an idle runner starts its keep_alive timer (or unloads at once)."""
        r.refcount -= 1
        if r.refcount > 0 or r.state is not RunnerState.READY:
            return
        if r.evicting or r.keep_alive <= 0:
            r.expires_at = time.time()
            self._unload(r)
            return
        r.expires_at = self.clock.deadline(r.keep_alive)
        r.timer = self.clock.timer(r.keep_alive, lambda: self._expire(r))

    def expire_now(self, key: str) -> bool:
        """The `keep_alive: 0` unload shortcut: unload now if idle, else as soon as it is."""
        r = self.runners.get(key)
        if r is None:
            return False
        r.keep_alive = 0.0
        r.expires_at = time.time()
        if r.idle and r.state is RunnerState.READY:
            if r.timer is not None:
                r.timer.cancel()
                r.timer = None
            self._unload(r)
        return True

    def _expire(self, r: Runner) -> None:
        r.timer = None
        if r.idle and r.state is RunnerState.READY:
            self.stats.bump("expirations")
            self._unload(r)

    # ---- memory -------------------------------------------------------------------------------

    def free_vram(self) -> list[int]:
        return [
            max(0, t - self.overhead - u - rel)
            for t, u, rel in zip(self.vram_total, self.vram_used, self.vram_releasing, strict=True)
        ]

    def _unload(self, r: Runner, *, release_delay: bool = True) -> None:
        if r.state is RunnerState.UNLOADED:
            return
        was_loading = r.state is RunnerState.LOADING
        r.state = RunnerState.UNLOADED
        if self.runners.get(r.key) is r:
            del self.runners[r.key]
        if r.timer is not None:
            r.timer.cancel()
            r.timer = None
        if not r.loaded.done():
            r.loaded.set_result(False)
        r.unloaded.set()
        if not was_loading:
            self.stats.bump("unloads", model=None)
        log.debug("unloaded %s", r.key)
        per_gpu = r.placement.per_gpu
        self.ram_used -= r.size - r.size_vram
        for i, b in per_gpu.items():
            self.vram_used[i] -= b
        if not per_gpu:
            return
        delay = self.config.vram_release_s if release_delay else 0.0
        if delay <= 0 or self.clock.scale == 0:
            self._released.set()
            return
        for i, b in per_gpu.items():
            self.vram_releasing[i] += b

        def done() -> None:
            for i, b in per_gpu.items():
                self.vram_releasing[i] -= b
            self._released.set()

        asyncio.get_running_loop().call_later(self.clock.real(delay), done)

    # ---- the loader loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            p = self._pending.popleft()
            if p.future.done():
                continue
            try:
                await self._process(p)
            except CorralError as e:
                if not p.future.done():
                    p.future.set_exception(e)
            except Exception as e:  # one request's failure must not stop the loader
                log.exception("scheduling %s failed", p.model.key)
                if not p.future.done():
                    p.future.set_exception(InternalError(str(e)))

    def pick_victim(self) -> Runner | None:
        return pick_victim(list(self.runners.values()))

    async def _evict(self, victim: Runner) -> None:
        victim.evicting = True
        victim.keep_alive = 0.0
        if victim.idle and victim.state is RunnerState.READY:
            self._unload(victim)
        await victim.unloaded.wait()
        await self._wait_vram_recovered()

    async def _wait_vram_recovered(self) -> None:
        """Until no unloaded runner's VRAM is still being released, or `VRAM_RECOVERY_S` passed."""
        if not any(self.vram_releasing):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.clock.real(VRAM_RECOVERY_S)
        while any(self.vram_releasing):
            left = deadline - loop.time()
            if left <= 0:
                log.info("VRAM not recovered after %.1f s; placing with what is free", VRAM_RECOVERY_S)
                return
            self._released.clear()
            try:
                await asyncio.wait_for(self._released.wait(), left)
            except TimeoutError:
                continue

    async def _wait_released(self) -> None:
        self._released.clear()
        await self._released.wait()

    async def _process(self, p: _Pending) -> None:
        model, opts = p.model, p.options
        num_parallel = self.num_parallel_for(model)
        need = estimate(model, opts, num_parallel)
        while True:
            if p.future.done():
                return
            r = self.runners.get(model.key)
            if r is not None:
                if r.state is RunnerState.LOADING:
                    await asyncio.shield(r.loaded)
                    continue
                if not r.evicting and not needs_reload(r.options, opts):
                    self._attach(r, p.keep_alive)
                    p.future.set_result(r)
                    return
                if not r.evicting:
                    self.stats.bump("reloads", model=model.key)
                    log.info("reloading %s: runner options changed", model.key)
                await self._evict(r)
                continue
            if len(self.runners) >= self.config.max_loaded:
                victim = self.pick_victim()
                if victim is not None:
                    self.stats.bump("evictions")
                    await self._evict(victim)
                    continue
            placement = fit(
                need,
                self.free_vram(),
                others_loaded=bool(self.runners),
                ram_free=self.ram_total - self.ram_used,
                num_gpu=opts.num_gpu,
                layers=model.config.layers,
            )
            if placement is None:
                if any(self.vram_releasing):
                    await self._wait_released()
                    continue
                victim = self.pick_victim()
                if victim is not None:
                    self.stats.bump("evictions")
                    await self._evict(victim)
                    continue
                raise InternalError(
                    f"model requires more system memory ({need / GIB:.1f} GiB) than is available "
                    f"({(self.ram_total - self.ram_used + sum(self.free_vram())) / GIB:.1f} GiB)"
                )
            await self._load(p, placement, num_parallel)
            return

    def load_seconds(self, model: LocalModel) -> float:
        return self.config.load_seconds(model.config.size)

    async def _load(self, p: _Pending, placement: Placement, num_parallel: int) -> None:
        keep_alive = self.default_keep_alive if p.keep_alive is None else p.keep_alive
        r = Runner(p.model, p.options, num_parallel, placement, keep_alive)
        r.expires_at = self.clock.deadline(keep_alive)
        self.runners[r.key] = r
        for i, b in placement.per_gpu.items():
            self.vram_used[i] += b
        self.ram_used += placement.size - placement.size_vram
        self.loading = r
        self.stats.bump("loads", model=r.key)
        if placement.size_vram < placement.size:
            self.stats.bump("partial_loads", model=r.key)
        log.info("loading %s (%d bytes, %d in VRAM)", r.key, placement.size, placement.size_vram)
        task = asyncio.get_running_loop().create_task(self.clock.sleep(self.load_seconds(p.model)))
        p.load_task = task
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            task.cancel()
            self._unload(r, release_delay=False)
            raise
        finally:
            self.loading = None
        if task.cancelled() or p.future.done():
            log.info("load of %s aborted: client went away", r.key)
            self.stats.bump("load_aborts", model=r.key)
            self._unload(r)
            return
        r.state = RunnerState.READY
        r.loaded_at = time.time()
        r.loaded.set_result(True)
        self.stats.bump("loads_completed", model=r.key)
        self._attach(r, None)
        p.future.set_result(r)
