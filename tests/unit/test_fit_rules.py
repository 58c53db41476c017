"""Ollama's memory estimate and fit rules in the routing cost model, on constructed fleets."""

from __future__ import annotations

import msgspec
import pytest
from corral import routing
from corral.protocol.messages import AgentState
from corral.routing import Route, Router, estimate_wait, fits, load_plan, loading_for
from corral.routing.memory import (
    GRAPH_BYTES,
    estimate_size,
    max_runners,
    observed_sizes,
    plan_load,
    with_loads,
)

from tests.unit.qwen_fleet import GB, GIB, MODEL, agent, ps

IDLE = "idle:latest"
BUSY = "busy:latest"


def rank(agents: list[AgentState], route: Route | None = None) -> list[str]:
    return [a.id for a in Router(seed=0).rank("auto", route or Route(MODEL), agents, {})]


# -- the estimate ---------------------------------------------------------------------------------


def test_estimate_is_weights_plus_kv_cache_for_context_times_parallel_plus_graph() -> None:
    kv_one = 2 * 48 * 8 * 128 * 32768 * 2  # 6 GiB at 32k, f16
    a1, a4 = agent("a", parallel=1), agent("b", parallel=4)
    assert load_plan(Route(MODEL), a1).size == 9 * GB + kv_one + GRAPH_BYTES
    assert load_plan(Route(MODEL), a4).size == 9 * GB + 4 * kv_one + GRAPH_BYTES
    # a context above the trained one is capped, as Ollama caps it
    assert load_plan(Route(MODEL, num_ctx=131072), a1).size == 9 * GB + kv_one + GRAPH_BYTES
    # without the model's shape: the file size, as before
    assert load_plan(Route(MODEL), agent("c", meta=False)).size == 9 * GB


def test_the_file_size_fits_where_the_loaded_size_does_not() -> None:
    # 24 GiB GPU, a 5 GB model beside: the 9 GB file fits in free VRAM, 9 GB + 2 × 6 GiB KV does not
    a = agent("a", parallel=2, loaded=(ps(IDLE, 5 * GB),))
    plan = load_plan(Route(MODEL), a)
    assert plan.size > 21 * GB and plan.evicts == (IDLE,)
    assert not fits(Route(MODEL), a)


def test_an_observed_runner_at_that_context_replaces_the_estimate() -> None:
    seen_here = agent("seen", loaded=(ps(MODEL, 16 * GB, ctx=32768),))
    seen_other_ctx = agent("other", loaded=(ps(MODEL, 30 * GB, ctx=8192),))
    cold = agent("cold")
    observed = observed_sizes([seen_here, seen_other_ctx, cold])
    assert estimate_size(MODEL, 32768, 9 * GB, cold, observed) == 16 * GB
    assert load_plan(Route(MODEL), cold, observed).size == 16 * GB
    # observed for another parallelism: not this runner
    assert estimate_size(MODEL, 32768, 9 * GB, agent("p", parallel=2), observed) != 16 * GB


# -- the fit rule ---------------------------------------------------------------------------------


def test_with_others_loaded_a_full_fit_needs_80_percent_of_free_vram() -> None:
    size = 16 * GB
    # 24 GiB − 4 GB beside = 21.8 GB free; 80 % = 17.4 GB ≥ 16 GB: fits beside
    assert plan_load(MODEL, size, agent("a", loaded=(ps(IDLE, 4 * GB),))).evicts == ()
    # 24 GiB − 6 GB beside = 19.8 GB free; 80 % = 15.8 GB < 16 GB: Ollama evicts even though 16 < 19.8
    plan = plan_load(MODEL, size, agent("b", loaded=(ps(IDLE, 6 * GB),)))
    assert plan.evicts == (IDLE,) and plan.full
    # alone, the whole of free VRAM counts
    assert plan_load(MODEL, 25 * GB, agent("c", vram=26 * GIB)).full


def test_eviction_takes_idle_models_first_and_costs() -> None:
    a = agent("a", loaded=(ps(BUSY, 9 * GB), ps(IDLE, 9 * GB)), busy=(BUSY,), in_flight=1)
    plan = plan_load(MODEL, 12 * GB, a)
    assert plan.evicts == (IDLE,) and not plan.thrashes
    a = agent("a", loaded=(ps(IDLE, 10 * GB),))
    free = agent("free")
    assert estimate_wait(Route(MODEL), a, {}) == pytest.approx(
        estimate_wait(Route(MODEL), free, {}) + routing.EVICTION_S
    )


def test_partial_offload_only_alone_and_costed_with_slower_decode() -> None:
    small = agent("small", vram=12 * GIB)  # alone: 15.7 GB estimate, 12.9 GB of VRAM
    plan = load_plan(Route(MODEL), small)
    assert not plan.full and 0 < plan.offload < 0.25
    big = agent("big", vram=48 * GIB)
    extra = estimate_wait(Route(MODEL), small, {}) - estimate_wait(Route(MODEL), big, {})
    assert extra == pytest.approx(
        routing.OFFLOAD_S + plan.offload * routing.CPU_DECODE_SLOWDOWN * routing.TYPICAL_REQUEST_S
    )
    # with another model loaded it does not spill: that model is evicted instead
    beside = agent("beside", vram=12 * GIB, loaded=(ps(IDLE, 2 * GB),))
    assert load_plan(Route(MODEL), beside).evicts == (IDLE,)


def test_a_full_fit_anywhere_beats_a_partial_offload() -> None:
    small = agent("a-small", vram=12 * GIB)
    roomy = agent("z-roomy", loaded=(ps(IDLE, 9 * GB), ps("idle2:latest", 9 * GB)))  # evicts both
    assert rank([small, roomy]) == ["z-roomy", "a-small"]


# -- never thrash ---------------------------------------------------------------------------------


def test_a_cold_load_does_not_evict_a_busy_model_when_another_agent_can_take_it() -> None:
    # "a-busy" would evict BUSY (its counts lag: it says no request is in flight, so the drain
    # costs nothing and by cost alone it is the cheaper choice); "z-spare" must evict two idle models
    busy = agent("a-busy", loaded=(ps(BUSY, 20 * GB),), busy=(BUSY,))
    spare = agent("z-spare", loaded=(ps(IDLE, 9 * GB), ps("idle2:latest", 9 * GB)))
    assert load_plan(Route(MODEL), busy).thrashes
    assert estimate_wait(Route(MODEL), busy, {}) < estimate_wait(Route(MODEL), spare, {})
    assert rank([busy, spare]) == ["z-spare", "a-busy"]


def test_when_every_agent_would_thrash_the_cheapest_still_goes_first() -> None:
    one = agent("a", loaded=(ps(BUSY, 20 * GB),), busy=(BUSY,), in_flight=4)
    two = agent("b", loaded=(ps(BUSY, 20 * GB),), busy=(BUSY,), in_flight=1)
    assert rank([one, two]) == ["b", "a"]


def test_an_agent_without_busy_models_but_with_requests_counts_its_models_busy() -> None:
    old = agent("old", loaded=(ps(IDLE, 20 * GB),), in_flight=2)
    assert load_plan(Route(MODEL), old).thrashes
    assert not load_plan(Route(MODEL), agent("quiet", loaded=(ps(IDLE, 20 * GB),))).thrashes


def test_a_warm_agent_is_not_a_last_resort() -> None:
    warm = agent("warm", loaded=(ps(MODEL, 16 * GB, ctx=32768),), busy=(MODEL,), in_flight=1)
    spare = agent("spare", vram=12 * GIB)
    assert rank([spare, warm]) == ["warm", "spare"]


def test_a_load_beyond_the_models_ollama_keeps_at_once_unloads_an_idle_one() -> None:
    small = tuple(ps(f"small{i}:latest", 2 * GB) for i in range(3))
    three = agent("three", vram=48 * GIB, loaded=small)  # Ollama's default on one GPU: 3 models
    plan = load_plan(Route(MODEL), three)
    assert plan.full and plan.evicts == ("small0:latest",)  # room enough, yet one of them goes
    assert load_plan(Route(MODEL), agent("four", vram=48 * GIB, loaded=small, max_loaded=4)).evicts == ()
    # the load goes where nothing has to make way for it
    two = agent("two", vram=48 * GIB, loaded=small[:2])
    assert rank([three, two]) == ["two", "three"]
    two_gpus = msgspec.structs.replace(three, gpus=three.gpus * 2)
    assert (max_runners(three), max_runners(two_gpus)) == (3, 6)  # three per GPU
    assert load_plan(Route(MODEL), two_gpus).evicts == ()


def test_a_load_just_placed_takes_memory_and_a_place_before_the_agent_shows_it() -> None:
    shown = agent("a", vram=24 * GIB, loaded=(ps("other:latest", 4 * GB),))
    soon = with_loads(shown, [(MODEL, 8192, 15 * GB), ("other:latest", 0, 4 * GB)])  # the second is loaded
    assert soon.loading == (MODEL,) and [m.name for m in soon.loaded] == ["other:latest", MODEL]
    # the load is for its own context: a request at another one is not served by it
    assert loading_for(Route(MODEL, num_ctx=8192), soon) and not loading_for(Route(MODEL), soon)
    assert soon.gpus[0].vram_free == shown.gpus[0].vram_free - 15 * GB
    assert load_plan(Route(MODEL), soon).size == load_plan(Route(MODEL), shown).size
    eight = Route("eight:latest", model_size=8 * GB)
    assert load_plan(eight, soon).evicts  # 15 GB more in use: room only by unloading
    assert not load_plan(eight, shown).evicts
