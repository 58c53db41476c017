"""Routing strategies on constructed fleet snapshots: each strategy's order, vendor handling, auto's costs."""

from __future__ import annotations

import itertools
from collections import Counter

import msgspec
import pytest
from corral import routing
from corral.protocol.messages import AgentState, Gpu, PsModel, TagModel
from corral.routing import (
    STRATEGIES,
    Route,
    Router,
    estimate_ttft,
    estimate_wait,
    has_model,
    load,
    loading_for,
    parse_strategy,
    pull_order,
    warm,
)
from hypothesis import given, settings
from hypothesis import strategies as st

PROPERTY = settings(max_examples=200, derandomize=True, database=None, deadline=None)

GB = 1_000_000_000
MODEL = "llama3.2:latest"
OTHER = "qwen2.5:7b"


def agent(
    id: str,
    *,
    vendor: str = "nvidia",
    loaded: bool = False,
    ctx: int = 0,
    loading: bool = False,
    model: str = MODEL,
    size: int = 8 * GB,
    parallel: int = 1,
    in_flight: int = 0,
    queued: int = 0,
    free: tuple[int, ...] | None = (24 * GB,),
) -> AgentState:
    """One agent with ``model`` on disk; optionally loaded (at ``ctx``) or loading; GPUs' free VRAM."""
    gpus = tuple(
        Gpu(index=i, name="gpu", vendor=vendor, vram_total=max(f, 24 * GB), vram_free=f)
        for i, f in enumerate(free or ())
    )
    ps = (
        PsModel(
            name=model,
            model=model,
            size=size,
            digest="d",
            expires_at="2100-01-01T00:00:00Z",
            size_vram=size,
            context_length=ctx,
        ),
    )
    return AgentState(
        id=id,
        vendor=vendor,
        host=id,
        ollama_url=f"http://{id}:11434",
        gpus=gpus,
        models=(TagModel(name=model, model=model, modified_at="", size=size, digest="d"),),
        loaded=ps if loaded else (),
        loading=(model,) if loading else (),
        parallel=parallel,
        in_flight=in_flight,
        queued=queued,
    )


def ids(agents: list[AgentState]) -> list[str]:
    return [a.id for a in agents]


def rank(
    strategy: str, route: Route, agents: list[AgentState], outstanding: dict[str, int] | None = None
) -> list[str]:
    return ids(Router(seed=0).rank(strategy, route, agents, outstanding or {}))


# -- parse_strategy ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
def test_parse_strategy_names(name: str) -> None:
    assert parse_strategy(name) == (name, None)
    assert parse_strategy(f"  {name.upper()} ") == (name, None)


@pytest.mark.parametrize("vendor", ["nvidia", "amd", "intel", "apple", "cpu"])
def test_parse_strategy_vendors_are_preferences_under_the_default(vendor: str) -> None:
    assert parse_strategy(vendor.capitalize()) == (None, vendor)


def test_parse_strategy_accepts_hyphens_and_empty() -> None:
    assert parse_strategy("Round-Robin") == ("round_robin", None)
    assert parse_strategy("least-connection") == ("least_connection", None)
    assert parse_strategy("") == (None, None)


def test_parse_strategy_unknown_lists_valid_values() -> None:
    with pytest.raises(ValueError, match="fastest") as err:
        parse_strategy("fastest")
    for valid in (*STRATEGIES, "nvidia", "cpu"):
        assert valid in str(err.value)


def test_rank_rejects_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="valid"):
        Router().rank("fastest", Route(MODEL), [agent("a")], {})


def test_no_agents_ranks_empty() -> None:
    for strategy in STRATEGIES:
        assert Router().rank(strategy, Route(MODEL), [], {}) == []


# -- round_robin ---------------------------------------------------------------------------------


def test_round_robin_rotates_by_id_whatever_the_input_order() -> None:
    router = Router()
    fleet = [agent("c"), agent("a"), agent("b")]
    firsts = [router.rank("round_robin", Route(MODEL), fleet, {})[0].id for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert ids(router.rank("round_robin", Route(MODEL), list(reversed(fleet)), {})) == ["a", "b", "c"]


def test_round_robin_cursor_is_per_model() -> None:
    router = Router()
    fleet_a = [agent("a"), agent("b"), agent("c")]
    fleet_b = [agent("a", model=OTHER), agent("b", model=OTHER)]
    assert router.rank("round_robin", Route(MODEL), fleet_a, {})[0].id == "a"
    assert router.rank("round_robin", Route(MODEL), fleet_a, {})[0].id == "b"
    assert router.rank("round_robin", Route(OTHER), fleet_b, {})[0].id == "a"  # its own cursor
    assert router.rank("round_robin", Route(MODEL), fleet_a, {})[0].id == "c"
    assert router.rank("round_robin", Route(OTHER), fleet_b, {})[0].id == "b"


def test_round_robin_rotates_fairly_within_the_preferred_vendor() -> None:
    router = Router()
    fleet = [agent("a"), agent("b", vendor="amd"), agent("c")]
    route = Route(MODEL, vendor="nvidia")
    orders = [ids(router.rank("round_robin", route, fleet, {})) for _ in range(4)]
    assert orders == [["a", "c", "b"], ["c", "a", "b"], ["a", "c", "b"], ["c", "a", "b"]]


# -- random --------------------------------------------------------------------------------------


def test_random_is_reproducible_with_a_seed_and_reaches_everyone() -> None:
    fleet = [agent(i) for i in "abcde"]
    one, two = Router(seed=7), Router(seed=7)
    seq1 = [ids(one.rank("random", Route(MODEL), fleet, {})) for _ in range(50)]
    seq2 = [ids(two.rank("random", Route(MODEL), fleet, {})) for _ in range(50)]
    assert seq1 == seq2
    assert {s[0] for s in seq1} == set("abcde")
    assert len({tuple(s) for s in seq1}) > 10  # really shuffled, not rotated
    assert all(sorted(s) == list("abcde") for s in seq1)
    seq3 = [ids(Router(seed=8).rank("random", Route(MODEL), fleet, {})) for _ in range(50)]
    assert seq3 != seq1


# -- least_connection ----------------------------------------------------------------------------


def test_least_connection_counts_outstanding_and_slots() -> None:
    fleet = [agent("a", in_flight=1), agent("b"), agent("c", parallel=4, in_flight=2)]
    assert rank("least_connection", Route(MODEL), fleet) == ["b", "c", "a"]
    # b's snapshot lags: three sends to it have not shown up in its counts yet
    assert rank("least_connection", Route(MODEL), fleet, {"b": 3}) == ["c", "a", "b"]
    assert load(fleet[2], {"c": 2}) == 1.0


def test_least_connection_ties_by_id() -> None:
    assert rank("least_connection", Route(MODEL), [agent("b"), agent("a")]) == ["a", "b"]


# -- vram ----------------------------------------------------------------------------------------


def test_vram_most_free_first_summed_over_gpus() -> None:
    fleet = [
        agent("a", free=(10 * GB,)),
        agent("b", free=(8 * GB, 8 * GB)),
        agent("c", free=None),  # reports no GPUs: nothing known free
        agent("d", free=(12 * GB,)),
    ]
    assert rank("vram", Route(MODEL), fleet) == ["b", "d", "a", "c"]


# -- affinity ------------------------------------------------------------------------------------


def test_affinity_tiers_loaded_then_loading_then_disk_least_busy_within() -> None:
    fleet = [
        agent("disk"),
        agent("loading", loading=True),
        agent("loaded-busy", loaded=True, in_flight=3),
        agent("loaded", loaded=True, in_flight=1),
    ]
    assert rank("affinity", Route(MODEL), fleet) == ["loaded", "loaded-busy", "loading", "disk"]


def test_loaded_matches_any_spelling_of_the_model() -> None:
    spelt = agent("a", loaded=True, model="registry.ollama.ai/library/Llama3.2:latest")
    assert rank("affinity", Route(MODEL), [agent("0"), spelt]) == ["a", "0"]


# -- vendor --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vendor_preference_puts_vendor_first_and_keeps_the_rest(strategy: str) -> None:
    fleet = [agent("a", loaded=True), agent("b", vendor="amd"), agent("c", vendor="amd", in_flight=2)]
    order = rank(strategy, Route(MODEL, vendor="amd"), fleet)
    assert sorted(order[:2]) == ["b", "c"]
    assert order[2] == "a"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strict_vendor_filters(strategy: str) -> None:
    fleet = [agent("a", loaded=True), agent("b", vendor="amd"), agent("c", vendor="amd", in_flight=2)]
    assert sorted(rank(strategy, Route(MODEL, vendor="amd", strict=True), fleet)) == ["b", "c"]
    assert rank(strategy, Route(MODEL, vendor="intel", strict=True), fleet) == []


def test_preference_keeps_the_strategy_order_within_groups() -> None:
    fleet = [
        agent("a", in_flight=2),
        agent("b", vendor="amd"),
        agent("c"),
        agent("d", vendor="amd", in_flight=1),
    ]
    assert rank("least_connection", Route(MODEL, vendor="nvidia"), fleet) == ["c", "a", "b", "d"]


# -- auto ----------------------------------------------------------------------------------------


def test_auto_free_warm_slot_beats_a_queue() -> None:
    fleet = [agent("a", loaded=True, in_flight=1), agent("b", loaded=True, parallel=2, in_flight=1)]
    assert rank("auto", Route(MODEL), fleet) == ["b", "a"]
    assert estimate_wait(Route(MODEL), fleet[1], {}) == 0.0


def test_auto_a_free_slot_on_a_runner_partly_in_system_ram_comes_after_whole_ones() -> None:
    a = agent("a", loaded=True)
    spilled = msgspec.structs.replace(a, loaded=(msgspec.structs.replace(a.loaded[0], size_vram=2 * GB),))
    whole = agent("b", loaded=True, in_flight=0)
    assert rank("auto", Route(MODEL), [spilled, whole]) == ["b", "a"]
    assert estimate_wait(Route(MODEL), spilled, {}) > estimate_wait(Route(MODEL), whole, {}) == 0.0
    # on a CPU backend every runner is in system RAM: nothing faster to prefer
    cpu = msgspec.structs.replace(spilled, vendor="cpu")
    assert estimate_wait(Route(MODEL), cpu, {}) == 0.0


def test_auto_outstanding_sends_fill_a_slot() -> None:
    fleet = [agent("a", loaded=True), agent("b", loaded=True, parallel=2, in_flight=1)]
    assert rank("auto", Route(MODEL), fleet) == ["a", "b"]  # equal cost: less loaded first
    assert rank("auto", Route(MODEL), fleet, {"a": 1}) == ["b", "a"]


def test_auto_short_queue_beats_cold_load() -> None:
    fleet = [agent("cold", size=16 * GB), agent("warm", loaded=True, size=16 * GB, in_flight=1)]
    assert rank("auto", Route(MODEL), fleet) == ["warm", "cold"]
    assert estimate_wait(Route(MODEL), fleet[1], {}) < estimate_wait(Route(MODEL), fleet[0], {})


def test_auto_long_queue_loses_to_cold_load_with_free_vram() -> None:
    fleet = [
        agent("cold", size=16 * GB, free=(24 * GB,)),
        agent("warm", loaded=True, size=16 * GB, in_flight=1, queued=5),
    ]
    assert rank("auto", Route(MODEL), fleet) == ["cold", "warm"]


def test_auto_cold_placement_prefers_an_agent_where_the_model_fits() -> None:
    fleet = [
        agent("a-full", free=(2 * GB,)),
        agent("b-fits", free=(20 * GB,), in_flight=1),  # busier with another model, but no eviction
        agent("c-fits-idle", free=None),  # no GPUs reported: assumed to fit
    ]
    assert rank("auto", Route(MODEL), fleet) == ["c-fits-idle", "b-fits", "a-full"]


def test_auto_eviction_waits_for_running_requests_to_drain() -> None:
    def beside(a: AgentState) -> AgentState:  # another model fills the GPU: a load evicts it
        other = PsModel(name=OTHER, model=OTHER, size=20 * GB, digest="o", expires_at="", size_vram=20 * GB)
        return msgspec.structs.replace(a, loaded=(other,))

    idle, busy = beside(agent("idle", free=(1 * GB,))), beside(agent("busy", free=(1 * GB,), in_flight=2))
    assert estimate_wait(Route(MODEL), busy, {}) > estimate_wait(Route(MODEL), idle, {})


def test_auto_model_size_from_route_else_tags_else_default() -> None:
    a = agent("a", size=20 * GB, free=None)
    from_tags = estimate_wait(Route(MODEL), a, {})
    from_route = estimate_wait(Route(MODEL, model_size=2 * GB), a, {})
    assert from_tags == pytest.approx(routing.LOAD_OVERHEAD_S + 20 * GB / routing.LOAD_BANDWIDTH)
    assert from_route == pytest.approx(routing.LOAD_OVERHEAD_S + 2 * GB / routing.LOAD_BANDWIDTH)
    unknown = agent("u", size=0, free=None)
    assert estimate_wait(Route(MODEL), unknown, {}) == pytest.approx(
        routing.LOAD_OVERHEAD_S + routing.DEFAULT_MODEL_SIZE / routing.LOAD_BANDWIDTH
    )


def test_auto_loading_beats_cold_and_loses_to_warm() -> None:
    fleet = [agent("cold"), agent("loading", loading=True), agent("warm", loaded=True)]
    assert rank("auto", Route(MODEL), fleet) == ["warm", "loading", "cold"]


def test_a_runner_listed_while_loading_is_not_warm() -> None:
    # Ollama lists a runner in /api/ps from the start of its load; the agent says it is loading
    listed = agent("listed", loaded=True, loading=True)
    assert not warm(Route(MODEL), listed) and loading_for(Route(MODEL), listed)
    assert rank("auto", Route(MODEL), [listed, agent("warm", loaded=True)]) == ["warm", "listed"]


def test_a_load_counts_only_for_the_context_it_is_for() -> None:
    wide = msgspec.structs.replace(
        agent("wide", loaded=True, ctx=4096, loading=True), default_num_ctx=4096, loading_ctx={MODEL: 8192}
    )
    assert loading_for(Route(MODEL, num_ctx=8192), wide)
    assert not loading_for(Route(MODEL), wide) and not loading_for(Route(MODEL, num_ctx=2048), wide)
    default = msgspec.structs.replace(wide, loading_ctx={MODEL: 0})
    assert loading_for(Route(MODEL), default) and loading_for(Route(MODEL, num_ctx=4096), default)
    # a request for the default waits out the wide load and then a reload: a cold load elsewhere wins
    assert rank("auto", Route(MODEL), [wide, agent("disk")]) == ["disk", "wide"]
    assert rank("auto", Route(MODEL, num_ctx=8192), [wide, agent("disk")]) == ["wide", "disk"]


def test_auto_num_ctx_goes_to_the_matching_runner() -> None:
    fleet = [
        agent("a-4k", loaded=True, ctx=4096),
        agent("b-8k", loaded=True, ctx=8192, in_flight=1),  # a queue of one still beats a reload
    ]
    assert rank("auto", Route(MODEL, num_ctx=8192), fleet) == ["b-8k", "a-4k"]
    assert rank("auto", Route(MODEL, num_ctx=4096), fleet) == ["a-4k", "b-8k"]
    assert rank("auto", Route(MODEL), fleet) == ["a-4k", "b-8k"]  # no num_ctx: any runner will do


def test_auto_num_ctx_prefers_a_cold_load_to_thrashing_a_runner() -> None:
    fleet = [agent("a-4k", loaded=True, ctx=4096), agent("b-disk")]
    assert rank("auto", Route(MODEL, num_ctx=8192), fleet) == ["b-disk", "a-4k"]


def test_auto_unknown_context_length_counts_as_a_match() -> None:
    fleet = [agent("a-unknown", loaded=True, ctx=0), agent("b-disk")]
    assert rank("auto", Route(MODEL, num_ctx=8192), fleet) == ["a-unknown", "b-disk"]


def test_auto_session_agent_preferred_while_not_overloaded() -> None:
    fleet = [agent("a", loaded=True), agent("b", loaded=True, parallel=4, in_flight=2)]
    assert rank("auto", Route(MODEL), fleet) == ["a", "b"]
    assert rank("auto", Route(MODEL, session_agent="b"), fleet) == ["b", "a"]
    # all its slots taken: a short wait is still cheaper than re-reading the conversation
    full = [fleet[0], agent("b", loaded=True, parallel=4, in_flight=4)]
    assert rank("auto", Route(MODEL, session_agent="b"), full) == ["b", "a"]


def test_auto_session_agent_abandoned_when_clearly_overloaded() -> None:
    fleet = [agent("a", loaded=True), agent("b", loaded=True, in_flight=1, queued=3)]
    assert rank("auto", Route(MODEL, session_agent="b"), fleet) == ["a", "b"]


def test_auto_session_bonus_is_bounded_even_when_the_cache_would_pay() -> None:
    # b waits 4/3 s: less than the replay it saves, more than the hot-spot bound allows
    b = agent("b", loaded=True, parallel=3, in_flight=3)
    a = agent("a", loaded=True)
    route = Route(MODEL, session_agent="b")
    assert routing.SESSION_MAX_EXTRA_WAIT_S < estimate_wait(route, b, {}) < routing.SESSION_REPLAY_S
    assert estimate_ttft(route, b, {}) < estimate_ttft(route, a, {})  # taken alone, b looks better
    assert rank("auto", route, [a, b]) == ["a", "b"]


def test_auto_session_cache_is_gone_when_the_runner_must_reload() -> None:
    fleet = [agent("a", loaded=True, ctx=8192), agent("b", loaded=True, ctx=4096)]
    assert rank("auto", Route(MODEL, num_ctx=8192, session_agent="b"), fleet) == ["a", "b"]


def test_estimate_ttft_adds_prompt_eval_and_replay() -> None:
    a = agent("a", loaded=True)
    assert estimate_ttft(Route(MODEL), a, {}) == pytest.approx(routing.PROMPT_EVAL_S)
    assert estimate_ttft(Route(MODEL, session_agent="a"), a, {}) == pytest.approx(routing.PROMPT_EVAL_S)
    assert estimate_ttft(Route(MODEL, session_agent="x"), a, {}) == pytest.approx(
        routing.PROMPT_EVAL_S + routing.SESSION_REPLAY_S
    )


def test_auto_ties_by_load_then_id() -> None:
    fleet = [
        agent("c", loaded=True, parallel=4, in_flight=1),
        agent("b", loaded=True),
        agent("a", loaded=True),
    ]
    assert rank("auto", Route(MODEL), fleet) == ["a", "b", "c"]


# -- properties ----------------------------------------------------------------------------------

VENDOR = st.sampled_from(["nvidia", "amd", "cpu"])


@st.composite
def fleets(draw: st.DrawFn) -> list[AgentState]:
    n = draw(st.integers(min_value=0, max_value=8))
    out = []
    for i in range(n):
        state = draw(st.sampled_from(["disk", "loading", "loaded"]))
        out.append(
            agent(
                f"agent-{i}",
                vendor=draw(VENDOR),
                loaded=state == "loaded",
                loading=state == "loading",
                ctx=draw(st.sampled_from([0, 2048, 8192])),
                size=draw(st.integers(min_value=0, max_value=40 * GB)),
                parallel=draw(st.integers(min_value=0, max_value=4)),
                in_flight=draw(st.integers(min_value=0, max_value=6)),
                queued=draw(st.integers(min_value=0, max_value=6)),
                free=draw(st.none() | st.lists(st.integers(0, 48 * GB), max_size=2).map(tuple)),
            )
        )
    return out


routes = st.builds(
    Route,
    key=st.just(MODEL),
    vendor=st.none() | VENDOR,
    strict=st.booleans(),
    num_ctx=st.none() | st.sampled_from([2048, 8192]),
    session_agent=st.none() | st.sampled_from([f"agent-{i}" for i in range(4)]),
    model_size=st.integers(min_value=0, max_value=40 * GB),
)
outstandings = st.dictionaries(st.sampled_from([f"agent-{i}" for i in range(8)]), st.integers(0, 5))


@PROPERTY
@given(st.sampled_from(STRATEGIES), routes, fleets(), outstandings)
def test_rank_is_a_permutation_of_the_allowed_agents(
    strategy: str, route: Route, fleet: list[AgentState], outstanding: dict[str, int]
) -> None:
    order = Router(seed=1).rank(strategy, route, fleet, outstanding)
    allowed = [a for a in fleet if not (route.strict and route.vendor and a.vendor != route.vendor)]
    assert Counter(ids(order)) == Counter(ids(allowed))
    if route.vendor is not None:
        preferred = [a.vendor == route.vendor for a in order]
        assert preferred == sorted(preferred, reverse=True)  # the vendor's agents form a prefix
        if route.strict:
            assert all(preferred)


@PROPERTY
@given(routes, fleets(), outstandings)
def test_auto_without_session_orders_by_estimated_ttft(
    route: Route, fleet: list[AgentState], outstanding: dict[str, int]
) -> None:
    route = Route(route.key, num_ctx=route.num_ctx, model_size=route.model_size)
    order = Router().rank("auto", route, fleet, outstanding)
    costs = [estimate_ttft(route, a, outstanding) for a in order]
    assert costs == sorted(costs)


@PROPERTY
@given(routes, fleets(), st.integers(min_value=1, max_value=5))
def test_more_outstanding_never_makes_an_agent_look_faster(
    route: Route, fleet: list[AgentState], extra: int
) -> None:
    for a in fleet:
        assert estimate_wait(route, a, {a.id: extra}) >= estimate_wait(route, a, {})
        assert estimate_wait(route, a, {}) >= 0.0


@PROPERTY
@given(fleets(), st.integers(min_value=1, max_value=20))
def test_round_robin_spreads_first_choices_evenly(fleet: list[AgentState], calls: int) -> None:
    if not fleet:
        return
    router = Router()
    firsts = Counter(router.rank("round_robin", Route(MODEL), fleet, {})[0].id for _ in range(calls))
    counts = [firsts.get(a.id, 0) for a in fleet]
    assert max(counts) - min(counts) <= 1


def test_strategies_are_independent_of_input_order() -> None:
    fleet = [
        agent("a", loaded=True, in_flight=1),
        agent("b", loading=True),
        agent("c", free=(4 * GB,)),
        agent("d", loaded=True, parallel=2),
    ]
    for strategy in ("auto", "least_connection", "vram", "affinity", "round_robin"):
        orders = {tuple(rank(strategy, Route(MODEL), list(p))) for p in itertools.permutations(fleet)}
        assert len(orders) == 1, strategy


def test_a_name_without_a_key_is_routed_nowhere() -> None:
    """An agent reporting a name that is not a valid model name (no `key_of`) serves no model by
    it: not warm for any route, not a holder for a pull, whatever the name looks like."""
    bad = "Not A Model!"
    a = agent("a", model=bad, loaded=True)
    assert not warm(Route(bad.lower()), a) and not warm(Route(MODEL), a)
    assert not has_model(a, bad.lower())
    b = agent("b", model=MODEL)
    # the pull rule ranks the agent that has the model first; a bad name counts for nothing
    assert ids(pull_order([a, b], MODEL, None)) == ["b", "a"]
    assert ids(pull_order([a, b], bad.lower(), None)) == ["a", "b"]  # fewest models, then id


def test_pull_order_prefers_holders_then_fewest_models_and_honours_the_vendor() -> None:
    a = agent("a", vendor="amd", model=OTHER)
    b = agent("b", model=MODEL)
    c = agent("c", model=OTHER)
    assert ids(pull_order([c, b, a], MODEL, None)) == ["b", "a", "c"]
    assert ids(pull_order([c, b, a], MODEL, "amd")) == ["a"]
    assert ids(pull_order([a, b, c], OTHER, None)) == ["a", "c", "b"]


def test_pull_order_leaves_out_an_agent_whose_ollama_is_down() -> None:
    """It shows no models while down: were it a candidate, every pull would go to it first and fail."""
    down = msgspec.structs.replace(agent("a"), models=[], ollama_down=True)
    assert ids(pull_order([down, agent("b", model=OTHER)], MODEL, None)) == ["b"]


def test_num_ctx_above_the_trained_context_is_one_runner_and_one_marker() -> None:
    """32768, 65536 and 131072 on a model trained for 8192 are what Ollama runs at 8192: routed and
    marked as 8192, so they share the runner (and the load marker) and force no reload."""
    from corral.protocol.names import parse_name
    from corral.registry.placement import marker_key
    from corral.routing import route_ctx

    key = parse_name(MODEL).key
    trained = msgspec.structs.replace(agent("a", loaded=True, ctx=8192), trained_ctx={key: 8192})
    fleet = [agent("b"), trained]
    asked = (32768, 65536, 131072)
    assert {route_ctx(key, n, fleet) for n in asked} == {8192}
    assert len({marker_key(parse_name(MODEL).token, route_ctx(key, n, fleet)) for n in asked}) == 1
    assert all(warm(routing.Route(key=key, num_ctx=route_ctx(key, n, fleet)), trained) for n in asked)
    # an agent that does not know the trained context would reload for the raw value
    unknowing = agent("c", loaded=True, ctx=8192)
    assert not warm(routing.Route(key=key, num_ctx=65536), unknowing)
    assert warm(routing.Route(key=key, num_ctx=route_ctx(key, 65536, fleet)), unknowing)


def test_agents_that_said_they_are_full_count_their_free_slots_taken() -> None:
    """An agent that answered busy to a send marked now counts as full whatever its published
    counts say; the others, and the sender's own counts, are left as they are."""
    shown_free = agent("a", loaded=True, parallel=4, in_flight=1)
    full = agent("b", loaded=True, parallel=2, in_flight=2)
    other = agent("c", loaded=True, parallel=2)
    fleet = [shown_free, full, other]
    outstanding = {"a": 1}

    taken = routing.slots_taken(fleet, outstanding, {"a", "b"})
    assert taken == {"a": 3}  # one of ours, one in flight, and the two it showed free
    assert [load(a, taken) for a in fleet] == [1.0, 1.0, 0.0]
    assert outstanding == {"a": 1}
    assert routing.slots_taken(fleet, outstanding, {"b"}) is outstanding  # nothing it showed free
    route = Route(key=MODEL)
    assert estimate_wait(route, shown_free, taken) > estimate_wait(route, shown_free, outstanding) == 0.0
