"""Demand-driven replicas on constructed fleets: observed load times, the backlog's drain time, and
how many loads `plan_replicas` starts for a backlog (`corral.routing.loads`, `.replicas`)."""

from __future__ import annotations

import math

import msgspec
import pytest
from corral.agent.runners import RunnerTracker
from corral.agent.worker import reply_load_s
from corral.protocol.messages import AgentState, Gpu, PsModel, TagModel, agent_state_decoder
from corral.protocol.names import parse_name
from corral.routing import (
    LOAD_BANDWIDTH,
    LOAD_OVERHEAD_S,
    Route,
    Router,
    drain_s,
    load_time,
    observed_load_s,
    observed_times,
    plan_replicas,
)

GB = 1_000_000_000
NAME = "llama3.2:latest"
KEY = parse_name(NAME).key
TOKEN = parse_name(NAME).token
ROUTE = Route(key=KEY)
OTHER = "qwen2.5:14b"


def agent(
    id: str,
    *,
    warm: bool = False,
    loading: bool = False,
    load_s: float = 0.0,
    parallel: int = 1,
    vram: int = 24 * GB,
    gpu: str = "gpu",
    loaded_other: int = 0,
    busy_other: bool = False,
) -> AgentState:
    """``NAME`` (2 GB file) on disk; ``warm``: loaded and serving; ``loading``: a load under way;
    ``loaded_other``: bytes of another model in VRAM (``busy_other``: with requests running)."""
    loaded = []
    if warm:
        loaded.append(
            PsModel(name=NAME, model=NAME, size=2 * GB, digest="d", expires_at="", size_vram=2 * GB)
        )
    if loaded_other:
        loaded.append(
            PsModel(
                name=OTHER, model=OTHER, size=loaded_other, digest="o", expires_at="", size_vram=loaded_other
            )
        )
    used = sum(m.size_vram for m in loaded)
    return AgentState(
        id=id,
        vendor="nvidia",
        host=id,
        ollama_url=f"http://{id}:11434",
        gpus=(Gpu(index=0, name=gpu, vendor="nvidia", vram_total=vram, vram_free=vram - used),),
        models=(TagModel(name=NAME, model=NAME, modified_at="", size=2 * GB, digest="d"),),
        loaded=tuple(loaded),
        loading=(KEY,) if loading else (),
        parallel=parallel,
        busy_models=(OTHER,) if busy_other else (),
        in_flight=1 if busy_other else 0,
        load_s={KEY: load_s} if load_s else {},
    )


ESTIMATE = LOAD_OVERHEAD_S + 2 * GB / LOAD_BANDWIDTH  # the cost model's guess for the 2 GB file


# -- observed load times ---------------------------------------------------------------------------


def test_load_time_is_the_agents_own_observation_else_one_like_it_else_the_estimate() -> None:
    seen, same, other_gpu = agent("a", load_s=0.3), agent("b"), agent("c", gpu="other")
    loads = observed_times([seen, same, other_gpu])
    assert observed_load_s(KEY, seen) == 0.3
    assert load_time(ROUTE, seen) == 0.3  # its own, without the fleet's
    assert load_time(ROUTE, same, loads) == 0.3  # an agent like it loaded it that fast
    assert observed_load_s(KEY, same) is None
    assert load_time(ROUTE, same) == pytest.approx(ESTIMATE)  # nothing observed: the estimate
    # other GPUs: not like it, so the estimate, at the pace the fleet's loads show (0.3 s for a
    # load estimated at 2 s: the fleet loads at 0.15 of the nominal time)
    assert load_time(ROUTE, other_gpu, loads) == pytest.approx(ESTIMATE * 0.3 / ESTIMATE)


def test_an_estimate_runs_at_the_agents_own_pace_else_the_fleets() -> None:
    """An agent that has loaded other models is as fast (or slow) against the estimate as it was
    for them; one that has loaded nothing goes at the fleet's median pace. So an unobserved agent
    never looks dearer than an observed one only because nobody has watched it load yet."""
    other = "mistral:7b"  # another 2 GB file: estimated at ESTIMATE like the routed model

    def loaded_other(id: str, gpu: str, seconds: float) -> AgentState:
        a = agent(id, gpu=gpu)
        listed = (*a.models, msgspec.structs.replace(a.models[0], name=other, model=other))
        return msgspec.structs.replace(a, models=listed, load_s={other: seconds})

    fast_disk, slow_disk = loaded_other("fast", "g1", ESTIMATE / 4), loaded_other("slow", "g2", ESTIMATE * 2)
    fresh = agent("fresh", gpu="g3")
    loads = observed_times([fast_disk, slow_disk, fresh])
    assert loads.pace == {"fast": 0.25, "slow": 2.0}
    assert load_time(ROUTE, fast_disk, loads) == pytest.approx(ESTIMATE / 4)
    assert load_time(ROUTE, slow_disk, loads) == pytest.approx(ESTIMATE * 2)
    assert load_time(ROUTE, fresh, loads) == pytest.approx(ESTIMATE * (0.25 + 2.0) / 2)  # the median


def test_the_slowest_load_seen_on_like_agents_counts() -> None:
    loads = observed_times([agent("a", load_s=0.3), agent("b", load_s=1.2), agent("c")])
    assert load_time(ROUTE, agent("c"), loads) == 1.2


def test_the_router_ranks_by_the_observed_load_time() -> None:
    slow, fast = agent("a", load_s=30.0), agent("b", gpu="other", load_s=0.2)
    assert [a.id for a in Router(seed=0).rank("auto", ROUTE, [slow, fast], {})] == ["b", "a"]


def test_an_agent_state_without_load_times_still_decodes() -> None:
    old = b'{"id":"a","vendor":"cpu","host":"h","ollama_url":"http://h:11434"}'
    assert agent_state_decoder.decode(old).load_s == {}
    assert b"load_s" not in msgspec.json.encode(agent("a"))  # nothing observed: nothing sent


@pytest.mark.parametrize(
    ("tail", "elapsed", "expected"),
    [
        # a load-only reply (an empty prompt) comes when the load ends: the request's own time
        (b'{"model":"m","created_at":"t","response":"","done":true,"done_reason":"load"}\n', 2.5, 2.5),
        # load_duration's share of total_duration, on our clock (a simulator's runs 10x faster here)
        (b'{"done":true,"total_duration":10000000000,"load_duration":6000000000,"eval_count":3}\n', 1.0, 0.6),
        (b'data: {"id":"x"}\n\ndata: [DONE]\n\n', 1.0, None),  # /v1: no timings
        (b'"response":"cut", "done":true}', 1.0, None),  # the tail starts mid-object
        (b'{"done":true,"total_duration":5,"eval_count":3}\n', 1.0, None),  # no load reported
    ],
)
def test_reply_load_s(tail: bytes, elapsed: float, expected: float | None) -> None:
    got = reply_load_s(tail, elapsed)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_the_tracker_keeps_the_load_time_of_the_request_that_started_the_load() -> None:
    t = RunnerTracker(4096)
    t.will_run(TOKEN, "first", 0)  # the model is cold: this one loads it
    t.will_run(TOKEN, "second", 0)  # waits on the same load
    t.responded(TOKEN, "first", 200)
    assert not t.served(TOKEN, 0, 200, "second", 0.05).state  # it waited for part of the load only
    assert t.load_s == {}
    assert t.served(TOKEN, 0, 200, "first", 1.5).state  # published with the agent's state
    assert t.load_s == {KEY: 1.5}
    t.observe(
        [PsModel(name=NAME, model=NAME, size=1, digest="d", expires_at="", size_vram=1, context_length=4096)],
        {NAME: 0},
        busy=(),
        default_num_ctx=4096,
    )
    t.will_run(TOKEN, "warm", 0)  # a request on the warm runner loads nothing
    assert not t.served(TOKEN, 0, 200, "warm", 0.001).state
    assert t.load_s == {KEY: 1.5}


def test_a_failed_load_records_nothing() -> None:
    t = RunnerTracker(4096)
    t.will_run(TOKEN, "first", 0)
    t.served(TOKEN, 0, 500, "first", 3.0)
    t.ended(TOKEN, "first")
    assert t.load_s == {}


# -- the backlog's drain time -----------------------------------------------------------------------


def test_drain_time_counts_rounds_of_requests_on_each_slot() -> None:
    assert drain_s(0, [(1.0, 1)], 4.0) == 0.0
    assert drain_s(10, [(4.0, 2)], 4.0) == 20.0  # 2 slots free at 4 s, then every 4 s: 5 rounds
    assert drain_s(10, [(4.0, 2), (1.0, 8)], 4.0) == 4.0  # 8 more slots after a 1 s load
    assert drain_s(3, [(math.inf, 1)], 4.0) == math.inf  # nothing ever frees
    assert drain_s(3, [(1.0, 2)], math.inf) == math.inf  # each slot takes one, never another
    assert drain_s(2, [(1.0, 2)], math.inf) == 1.0


# -- the replica rule -------------------------------------------------------------------------------


def test_fast_loads_and_a_deep_backlog_load_several_replicas_at_once() -> None:
    fleet = [agent("serving", warm=True, load_s=0.5)] + [agent(f"s{i}") for i in range(5)]
    plan = plan_replicas(ROUTE, fleet, depth=20, request_s=4.0)
    # 20 waiting may have 10 slots: all five spare agents load at once, each ready in half a second
    assert sorted(plan.load) == ["s0", "s1", "s2", "s3", "s4"]
    assert plan.drain_s == 80.0 and plan.load_s == 0.5  # like agents load in half a second


def test_slow_loads_and_a_short_backlog_load_nothing() -> None:
    fleet = [agent("serving", warm=True, parallel=2, load_s=60.0), agent("a"), agent("b")]
    plan = plan_replicas(ROUTE, fleet, depth=4, request_s=2.0)
    assert plan.load == ()  # drained in 4 s; a load would take a minute
    assert plan.drain_s == 4.0 and plan.candidates == ("a", "b")


def test_no_load_that_would_end_after_the_backlog_drained() -> None:
    # drained in 3 rounds of 1 s on the warm slot: a 2.5 s load helps, a 3.5 s one would not
    helps = [agent("serving", warm=True, load_s=2.5), agent("a")]
    too_late = [agent("serving", warm=True, load_s=3.5), agent("a")]
    assert plan_replicas(ROUTE, helps, depth=3, request_s=1.0, backlog_per_slot=1).load == ("a",)
    assert plan_replicas(ROUTE, too_late, depth=3, request_s=1.0, backlog_per_slot=1).load == ()


def test_loads_under_way_count() -> None:
    spare = [agent(f"s{i}") for i in range(4)]
    alone = plan_replicas(ROUTE, [agent("first", loading=True), *spare], depth=6, request_s=4.0)
    assert len(alone.load) == 2  # 6 waiting: 3 slots, the first load's and two more
    beside = [agent("first", loading=True), agent("second", loading=True), *spare]
    assert len(plan_replicas(ROUTE, beside, depth=6, request_s=4.0).load) == 1
    sent = plan_replicas(ROUTE, [agent("first", loading=True), *spare], 6, 4.0, starting=frozenset({"s0"}))
    assert len(sent.load) == 1 and "s0" not in sent.load  # a load this registry sent, not shown yet


def test_never_a_load_per_waiting_request() -> None:
    fleet = [agent("serving", warm=True, load_s=0.1)] + [agent(f"s{i}") for i in range(10)]
    for depth in (1, 2, 3, 8):
        plan = plan_replicas(ROUTE, fleet, depth=depth, request_s=60.0)
        assert 1 + len(plan.load) <= max(1, math.ceil(depth / 2)), (depth, plan.load)


def test_nothing_serving_or_loading_is_the_placements_business() -> None:
    assert plan_replicas(ROUTE, [agent("a"), agent("b")], depth=10, request_s=4.0).load == ()


def test_only_agents_where_the_model_fits_without_evicting() -> None:
    fleet = [
        agent("serving", warm=True),
        agent("full", vram=3 * GB, loaded_other=2 * GB),  # would evict an idle model: not a replica
        agent("busy", vram=3 * GB, loaded_other=2 * GB, busy_other=True),
        agent("room"),
    ]
    assert plan_replicas(ROUTE, fleet, depth=20, request_s=4.0).load == ("room",)


def test_a_model_warm_on_another_agent_too_may_make_room_for_a_replica_an_idle_one_first() -> None:
    """A backlog may take the memory of a model on a holder when another agent also has that model
    loaded: its requests keep a runner (and the holder turns them away while the load is under way,
    `corral.agent.runners`). An agent with free room comes first, then one where an idle model makes
    room, then one where a busy model does (its requests finish first); a model loaded nowhere else,
    or pinned, is never evicted for a replica."""
    elsewhere = agent("elsewhere", loaded_other=2 * GB)  # OTHER warm here too (not a holder: no NAME)
    full = agent("full", vram=3 * GB, loaded_other=2 * GB)
    busy = agent("busy", vram=3 * GB, loaded_other=2 * GB, busy_other=True)
    holders = [agent("serving", warm=True), busy, full]
    plan = plan_replicas(ROUTE, holders, depth=20, request_s=4.0, fleet=[*holders, elsewhere])
    assert plan.load == ("full", "busy")
    assert plan_replicas(ROUTE, holders, depth=3, request_s=4.0, fleet=[*holders, elsewhere]).load == (
        "full",
    )
    with_room = [*holders, agent("room")]
    plan = plan_replicas(ROUTE, with_room, depth=20, request_s=4.0, fleet=[*with_room, elsewhere])
    assert plan.load == ("room", "full", "busy")
    alone = [agent("serving", warm=True), full, busy]  # OTHER loaded nowhere but on these two
    assert plan_replicas(ROUTE, alone, depth=20, request_s=4.0, fleet=alone).load == ("full",)  # busy's stays
    pinned = frozenset({parse_name(OTHER).key})
    assert (
        plan_replicas(
            ROUTE, holders, depth=20, request_s=4.0, fleet=[*holders, elsewhere], pinned=pinned
        ).load
        == ()
    )


def test_two_copies_of_an_idle_model_are_not_both_unloaded_for_one_backlog() -> None:
    """Each of two holders keeps an idle copy of another model: either may give its copy up, since
    the other keeps one, but not both in one plan."""
    a, b = agent("a", vram=3 * GB, loaded_other=2 * GB), agent("b", vram=3 * GB, loaded_other=2 * GB)
    holders = [agent("serving", warm=True), a, b]
    assert len(plan_replicas(ROUTE, holders, depth=40, request_s=4.0, fleet=holders).load) == 1


def test_a_backlog_that_never_drains_gets_its_slots() -> None:
    # the warm slot is held by a request of unknown length (request_s inf): it takes none of the
    # backlog, so the backlog gets its slot per two waiting requests from replicas
    fleet = [agent("serving", warm=True, load_s=60.0), agent("a"), agent("b"), agent("c")]
    assert plan_replicas(ROUTE, fleet, depth=3, request_s=math.inf).load == ("a", "b")


def test_one_request_stuck_behind_busy_slots_gets_a_replica() -> None:
    """Four slots held by endless streams and one request waiting: however many slots serve the
    model, none will take it, and an idle agent with room loads the model for it."""
    fleet = [agent("serving", warm=True, parallel=4, load_s=1.0), agent("idle")]
    assert plan_replicas(ROUTE, fleet, depth=1, request_s=math.inf).load == ("idle",)
    assert plan_replicas(ROUTE, fleet, depth=1, request_s=2.0).load == ()  # it frees in 2 s
