"""The simulator's scheduler: fit rule, eviction order, reloads, queue, slots, prompt cache, timers."""

from __future__ import annotations

import asyncio
import time

import pytest
from corral.protocol.errors import NoCapacity
from corral.simulator import GpuConfig, ModelConfig, SimConfig
from corral.simulator.config import GB, GIB
from corral.simulator.context import SimContext
from corral.simulator.engine import Job
from corral.simulator.scheduler import (
    Placement,
    Runner,
    RunnerOptions,
    Slot,
    choose_slot,
    common_prefix,
    estimate,
    fit,
    needs_reload,
    pick_victim,
)
from corral.simulator.text import plan_reply, render_chat, tokenize

MODELS = [
    ModelConfig(name="small:latest", size_gb=2.0, capabilities=["completion"]),
    ModelConfig(name="mid:latest", size_gb=4.0, capabilities=["completion"]),
    ModelConfig(name="big:latest", size_gb=6.0, capabilities=["completion"]),
    ModelConfig(name="emb:latest", size_gb=0.05, capabilities=["embedding"]),
]


def make(**kw: object) -> SimContext:
    base: dict[str, object] = {
        "models": MODELS,
        "time_scale": 0.0,
        "gpus": [GpuConfig(vram_gb=24)],
        "context_length": 2048,
        "vram_release_s": 0.0,
    }
    base.update(kw)
    return SimContext.build(SimConfig(**base))  # type: ignore[arg-type]


def opts(num_ctx: int = 2048, **kw: int) -> RunnerOptions:
    return RunnerOptions(num_ctx=num_ctx, **kw)


def job(ctx: SimContext, name: str, keep_alive: float | None = None, **kw: int) -> Job:
    model = ctx.catalog.get(name)
    assert model is not None
    return Job(model=model, options=opts(**kw), keep_alive=keep_alive, tokens=[], t0=time.perf_counter())


# ---- pure functions ----------------------------------------------------------------------------


def test_first_model_may_partially_offload() -> None:
    p = fit(30 * GB, [24 * GB], others_loaded=False, ram_free=64 * GB, layers=40)
    assert p is not None and p.size == 30 * GB
    assert 0 < p.size_vram <= 24 * GB and p.size_vram < p.size


def test_other_models_loaded_need_80_percent_of_free() -> None:
    assert fit(7 * GB, [10 * GB], others_loaded=True, ram_free=64 * GB) == Placement({0: 7 * GB}, 7 * GB)
    assert fit(9 * GB, [10 * GB], others_loaded=True, ram_free=64 * GB) is None
    assert fit(9 * GB, [10 * GB], others_loaded=False, ram_free=64 * GB) == Placement({0: 9 * GB}, 9 * GB)


def test_fit_prefers_the_gpu_with_most_free_then_spreads() -> None:
    assert fit(5 * GB, [8 * GB, 16 * GB], others_loaded=True, ram_free=0) == Placement({1: 5 * GB}, 5 * GB)
    spread = fit(15 * GB, [10 * GB, 10 * GB], others_loaded=True, ram_free=0)
    assert spread is not None and spread.size_vram == 15 * GB and len(spread.per_gpu) == 2


def test_num_gpu_zero_and_cpu_only() -> None:
    assert fit(5 * GB, [24 * GB], others_loaded=False, ram_free=64 * GB, num_gpu=0) == Placement({}, 5 * GB)
    assert fit(5 * GB, [], others_loaded=True, ram_free=64 * GB) == Placement({}, 5 * GB)
    assert fit(80 * GB, [], others_loaded=False, ram_free=64 * GB) is None


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [1]) == 0
    long = list(range(1000))
    assert common_prefix(long, [*long[:777], -1, *long[778:]]) == 777


def test_runner_options_that_force_a_reload() -> None:
    base = opts(4096)
    assert not needs_reload(base, opts(4096))
    assert needs_reload(base, opts(8192))
    assert needs_reload(base, opts(4096, num_batch=1024))
    assert needs_reload(base, opts(4096, num_gpu=10))
    assert not needs_reload(opts(4096, num_gpu=10), opts(4096, num_gpu=-1))


def test_estimate_includes_kv_cache_per_slot() -> None:
    ctx = make()
    m = ctx.catalog.get("small")
    assert m is not None
    one = estimate(m, opts(4096), 1)
    two = estimate(m, opts(4096), 2)
    assert one > m.config.size
    assert two - m.config.size == 2 * (one - m.config.size)


async def test_eviction_order_is_keep_alive_then_idle_not_lru() -> None:
    ctx = make()

    def runner(name: str, keep_alive: float, refs: int) -> Runner:
        m = ctx.catalog.get(name)
        assert m is not None
        r = Runner(m, opts(), 1, Placement({0: GB}, GB), keep_alive)
        r.state = r.state.READY
        r.refcount = refs
        return r

    busy_short = runner("small", 60, 1)
    idle_long = runner("mid", 600, 0)
    forever = runner("big", float("inf"), 0)
    assert pick_victim([forever, idle_long, busy_short]) is idle_long
    assert pick_victim([forever, busy_short]) is forever
    busy_forever = runner("big", float("inf"), 2)
    assert pick_victim([busy_forever, busy_short]) is busy_short  # none idle: first anyway


# ---- the scheduler on a loop ------------------------------------------------------------------


async def test_load_then_fast_attach() -> None:
    ctx = make()
    ctx.scheduler.start()
    try:
        m = ctx.catalog.get("small")
        assert m is not None
        r1 = await ctx.scheduler.acquire(m, opts(), None)
        r2 = await ctx.scheduler.acquire(m, opts(), None)
        assert r1 is r2 and r1.refcount == 2
        assert ctx.stats.loads == 1 and ctx.stats.loads_completed == 1
        ctx.scheduler.release(r1)
        ctx.scheduler.release(r2)
        assert r1.timer is None  # time_scale=0: a positive keep_alive never fires
        assert ctx.scheduler.runners == {"small:latest": r1}
    finally:
        await ctx.scheduler.stop()


async def test_max_loaded_models_forces_eviction_of_shortest_keep_alive() -> None:
    ctx = make(max_loaded_models=2)
    s = ctx.scheduler
    s.start()
    try:
        for name, ka in (("small", 600.0), ("mid", 60.0)):
            m = ctx.catalog.get(name)
            assert m is not None
            s.release(await s.acquire(m, opts(), ka))
        big = ctx.catalog.get("big")
        assert big is not None
        s.release(await s.acquire(big, opts(), None))
        assert set(s.runners) == {"small:latest", "big:latest"}  # mid had the shortest keep_alive
        assert ctx.stats.evictions == 1 and ctx.stats.unloads == 1
    finally:
        await s.stop()


async def test_memory_pressure_evicts_until_it_fits() -> None:
    ctx = make(gpus=[GpuConfig(vram_gb=10)])
    s = ctx.scheduler
    s.start()
    try:
        for name in ("small", "mid"):  # 2 + 4 GB (+ tiny KV) fit in 10 GiB
            m = ctx.catalog.get(name)
            assert m is not None
            s.release(await s.acquire(m, opts(), None))
        assert len(s.runners) == 2
        big = ctx.catalog.get("big")
        assert big is not None
        r = await s.acquire(big, opts(), None)  # 6.3 GB must be ≤ 80 % of free: one must go
        assert set(s.runners) == {"small:latest", "big:latest"}  # equal keep_alive: by name, "mid" first
        assert r.size_vram == r.size
        assert ctx.stats.evictions == 1
        s.release(r)
    finally:
        await s.stop()


async def test_runner_option_change_reloads() -> None:
    ctx = make()
    s = ctx.scheduler
    s.start()
    try:
        m = ctx.catalog.get("small")
        assert m is not None
        r1 = await s.acquire(m, opts(2048), None)
        s.release(r1)
        r2 = await s.acquire(m, opts(4096), None)
        assert r2 is not r1 and r2.options.num_ctx == 4096
        assert ctx.stats.reloads == 1 and ctx.stats.loads == 2
        s.release(r2)
    finally:
        await s.stop()


async def test_full_pending_queue_is_busy() -> None:
    ctx = make(time_scale=1.0, max_queue=1, load_overhead_s=30.0)
    s = ctx.scheduler
    s.start()
    small, mid, big = (ctx.catalog.get(n) for n in ("small", "mid", "big"))
    assert small and mid and big
    first = asyncio.ensure_future(s.acquire(small, opts(), None))
    await ctx.stats.wait_for(lambda st: st.loads == 1)  # the loader took it off the queue
    second = asyncio.ensure_future(s.acquire(mid, opts(), None))
    await asyncio.sleep(0)
    with pytest.raises(NoCapacity) as e:
        await s.acquire(big, opts(), None)
    assert e.value.message == "server busy, please try again.  maximum pending requests exceeded"
    assert ctx.stats.busy_rejections == 1
    first.cancel()
    second.cancel()
    await s.stop()


async def test_abandoned_load_is_aborted_and_waiters_requeue() -> None:
    ctx = make(time_scale=1.0, load_overhead_s=30.0)
    s = ctx.scheduler
    s.start()
    m = ctx.catalog.get("small")
    assert m is not None
    trigger = asyncio.ensure_future(s.acquire(m, opts(), None))
    await ctx.stats.wait_for(lambda st: st.loads == 1)
    follower = asyncio.ensure_future(s.acquire(m, opts(), None))
    await asyncio.sleep(0)
    trigger.cancel()
    await ctx.stats.wait_for(lambda st: st.load_aborts == 1)
    await ctx.stats.wait_for(lambda st: st.loads == 2)  # the follower triggered a new load
    assert not follower.done()
    follower.cancel()
    await s.stop()


async def test_slots_are_fifo_and_unbounded() -> None:
    ctx = make()
    s = ctx.scheduler
    s.start()
    try:
        m = ctx.catalog.get("small")
        assert m is not None
        r = await s.acquire(m, opts(), None)
        first = await r.acquire_slot([1])
        order: list[int] = []

        async def waiter(i: int) -> None:
            slot = await r.acquire_slot([i])
            order.append(i)
            r.release_slot(slot)

        tasks = [asyncio.ensure_future(waiter(i)) for i in range(5)]
        await asyncio.sleep(0)
        assert r.waiting == 5
        tasks[2].cancel()  # a client that goes away leaves the queue
        r.release_slot(first)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
        assert order == [0, 1, 3, 4]
        assert not r.slots[0].busy
        s.release(r)
    finally:
        await s.stop()


async def test_prompt_cache_reuses_the_longest_prefix_slot() -> None:
    ctx = make(num_parallel=2)
    s = ctx.scheduler
    s.start()
    try:
        turn1 = [("user", "tell me a story about a fox")]
        j = job(ctx, "small")
        j.tokens = render_chat(turn1)
        j.plan = plan_reply(1)
        out1 = await ctx.engine.run(j, None)
        assert ctx.stats.prompt_tokens_cached == 0
        reply = "".join(j.plan.content)
        other = job(ctx, "small")
        other.tokens = render_chat([("user", "something else entirely, unrelated")])
        other.plan = plan_reply(2)
        await ctx.engine.run(other, None)
        turn2 = [*turn1, ("assistant", reply), ("user", "and then?")]
        j2 = job(ctx, "small")
        j2.tokens = render_chat(turn2)
        j2.plan = plan_reply(3)
        before = ctx.stats.prompt_tokens_evaluated
        out2 = await ctx.engine.run(j2, None)
        cached = len(render_chat(turn1)) + len(tokenize(reply))
        assert ctx.stats.prompt_tokens_cached == cached
        assert ctx.stats.prompt_tokens_evaluated - before == len(j2.tokens) - cached
        assert out2.prompt_eval_count == len(j2.tokens)  # reports the full prompt
        assert out2.prompt_eval_ns < out1.prompt_eval_ns * len(j2.tokens) / len(j.tokens)
    finally:
        await s.stop()


async def test_keep_alive_expires_on_scaled_time() -> None:
    ctx = make(time_scale=0.001)
    s = ctx.scheduler
    s.start()
    try:
        m = ctx.catalog.get("small")
        assert m is not None
        r = await s.acquire(m, opts(), 5.0)  # "5s" → 5 ms of wall time
        s.release(r)
        assert r.expires_at > time.time() - 1
        await ctx.stats.wait_for(lambda st: st.expirations == 1, timeout=2)
        assert not s.runners and ctx.stats.unloads == 1
    finally:
        await s.stop()


async def test_keep_alive_zero_unloads_when_idle_and_forever_never() -> None:
    ctx = make(time_scale=0.001)
    s = ctx.scheduler
    s.start()
    try:
        small, mid = ctx.catalog.get("small"), ctx.catalog.get("mid")
        assert small and mid
        s.release(await s.acquire(small, opts(), 0.0))
        await ctx.stats.wait_for(lambda st: st.unloads == 1, timeout=2)
        r = await s.acquire(mid, opts(), float("inf"))
        s.release(r)
        assert r.timer is None and r.expires_at == float("inf")
        assert s.expire_now("mid:latest") and not s.runners
    finally:
        await s.stop()


async def test_vram_release_delay_holds_memory_briefly() -> None:
    ctx = make(time_scale=0.001, vram_release_s=0.5, gpus=[GpuConfig(vram_gb=8)])
    s = ctx.scheduler
    s.start()
    try:
        mid, big = ctx.catalog.get("mid"), ctx.catalog.get("big")
        assert mid and big
        s.release(await s.acquire(mid, opts(), None))
        r = await asyncio.wait_for(s.acquire(big, opts(), None), 2)  # evicts mid, waits for its VRAM
        assert set(s.runners) == {"big:latest"} and ctx.stats.evictions == 1
        assert s.vram_releasing == [0]
        assert s.vram_used[0] == r.size_vram <= 8 * GIB
        s.release(r)
    finally:
        await s.stop()


async def test_after_an_eviction_the_next_load_waits_for_vram_and_fits_fully() -> None:
    ctx = make(time_scale=0.001, vram_release_s=0.5, gpus=[GpuConfig(vram_gb=8)])
    s = ctx.scheduler
    s.start()
    try:
        mid, big = ctx.catalog.get("mid"), ctx.catalog.get("big")
        assert mid and big
        s.release(await s.acquire(mid, opts(), None))
        r = await asyncio.wait_for(s.acquire(big, opts(), None), 2)
        assert ctx.stats.evictions == 1
        assert r.size_vram == r.size  # not spilled to the CPU while mid's memory was released
        assert s.ram_used == 0
        assert ctx.stats.partial_loads == 0
        s.release(r)
    finally:
        await s.stop()


async def test_vram_recovery_wait_is_bounded() -> None:
    # The released memory takes far longer than the loader waits: it places with what is free.
    ctx = make(time_scale=0.001, vram_release_s=60.0, gpus=[GpuConfig(vram_gb=8)])
    s = ctx.scheduler
    s.start()
    try:
        mid, big = ctx.catalog.get("mid"), ctx.catalog.get("big")
        assert mid and big
        s.release(await s.acquire(mid, opts(), None))
        r = await asyncio.wait_for(s.acquire(big, opts(), None), 2)
        assert 0 < r.size_vram < r.size and s.vram_releasing[0] > 0
        assert (ctx.stats.partial_loads, ctx.stats.model("big:latest").partial_loads) == (1, 1)
        s.release(r)
    finally:
        await s.stop()


async def test_embedding_models_get_one_slot() -> None:
    ctx = make(num_parallel=4)
    s = ctx.scheduler
    s.start()
    try:
        emb, small = ctx.catalog.get("emb"), ctx.catalog.get("small")
        assert emb and small
        r = await s.acquire(emb, opts(), None)
        assert len(r.slots) == 1
        r2 = await s.acquire(small, opts(), None)
        assert len(r2.slots) == 4
        s.release(r)
        s.release(r2)
    finally:
        await s.stop()


def test_choose_slot_prefers_prefix_then_least_recently_used() -> None:
    a, b, c = Slot(0), Slot(1), Slot(2)
    a.cached, a.used = [1, 2, 3, 4], 3
    b.cached, b.used = [9, 9], 1
    c.cached, c.used = [1, 2], 2
    assert choose_slot([a, b, c], [1, 2, 3, 4, 5, 6]) is a
    assert choose_slot([a, b, c], [7, 7, 7]) is b  # weak match everywhere: LRU keeps caches warm
    assert choose_slot([c], [7]) is c
