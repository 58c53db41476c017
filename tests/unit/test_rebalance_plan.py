"""Rebalancing on constructed fleets: the demand averages (`DemandMeter`), which card switches model
under a steady load (`plan_move`), including that no switch is undone at the same demand, and the
slots a replica leaves a model its demand needs (`plan_replicas` with ``demand``)."""

from __future__ import annotations

import itertools
import math

import pytest
from corral.protocol.messages import AgentState, Gpu, PsModel, TagModel
from corral.protocol.names import parse_name
from corral.routing import (
    Demand,
    DemandMeter,
    Route,
    Router,
    busy_shares,
    frees_for,
    load_plan,
    plan_move,
    plan_replicas,
    serving_slots,
    waiting,
)

GB = 1_000_000_000
A = parse_name("qwen3:8b").key  # the chats' model
B = parse_name("llama3.2").key  # the generations' model
NAMES = {A: "qwen3:8b", B: "llama3.2:latest"}
SIZE = 14 * GB  # one of them fills a 24 GB card: a switch evicts the other


def card(
    id: str,
    loaded: str | None,
    *,
    parallel: int = 4,
    disk: tuple[str, ...] = (A, B),
    loading: tuple[str, ...] = (),
    status: str = "active",
    load_s: dict[str, float] | None = None,
) -> AgentState:
    """A 24 GB card with ``disk``'s models (14 GB each) and ``loaded`` serving (None: nothing)."""
    runners = ()
    if loaded is not None:
        name = NAMES[loaded]
        runners = (PsModel(name=name, model=name, size=SIZE, digest=loaded, expires_at="", size_vram=SIZE),)
    used = sum(r.size_vram for r in runners)
    return AgentState(
        id=id,
        vendor="nvidia",
        host=id,
        ollama_url=f"http://{id}:11434",
        status=status,  # type: ignore[arg-type]
        gpus=(Gpu(index=0, name="gpu", vendor="nvidia", vram_total=24 * GB, vram_free=24 * GB - used),),
        models=tuple(
            TagModel(name=NAMES[k], model=NAMES[k], modified_at="", size=SIZE, digest=k) for k in disk
        ),
        loaded=runners,
        loading=loading,
        parallel=parallel,
        load_s=load_s or {},
    )


def fleet_of(*loaded: str | None) -> list[AgentState]:
    return [card(chr(ord("a") + i), m) for i, m in enumerate(loaded)]


def moved(fleet: list[AgentState], agent: str, key: str) -> list[AgentState]:
    return [card(a.id, key) if a.id == agent else a for a in fleet]


# -- the demand averages -------------------------------------------------------------------------------
def test_the_averages_settle_on_the_slots_in_use_and_the_queue_depth():
    meter = DemandMeter(10.0, now=0.0)
    for step in range(1, 601):  # a minute: six time constants, one sample every 0.1 s
        meter.ran(A, 3.0 * 0.1)  # three slots in use all along
        meter.sample(step * 0.1, {A: 2})
    d = meter.demand()[A]
    assert d.running == pytest.approx(3.0, rel=0.01)
    assert d.waiting == pytest.approx(2.0, rel=0.01)
    assert d.total == pytest.approx(5.0, rel=0.01)


def test_a_long_request_counted_at_its_end_moves_the_average_by_its_share():
    meter = DemandMeter(30.0, now=0.0)
    meter.ran(A, 20.0)  # one request held a slot 20 s and finished in this second
    meter.sample(1.0, {})
    # the second's 20 slot-seconds, weighted by one second's share of a 30 s constant
    assert meter.demand()[A].running == pytest.approx(20.0 * (1 - 2.718281828 ** (-1 / 30)), rel=1e-6)


def test_a_model_with_no_more_requests_is_forgotten():
    meter = DemandMeter(1.0, now=0.0)
    meter.ran(A, 5.0)
    meter.sample(1.0, {A: 1})
    assert A in meter.demand()
    for step in range(2, 40):
        meter.sample(float(step), {})
    assert A not in meter.demand()


def test_a_sample_at_the_same_instant_changes_nothing():
    meter = DemandMeter(10.0, now=5.0)
    meter.ran(A, 1.0)
    meter.sample(5.0, {A: 3})
    assert meter.demand() == {}


def test_the_time_constant_must_be_positive():
    with pytest.raises(ValueError):
        DemandMeter(0.0, now=0.0)


# -- the switch ----------------------------------------------------------------------------------------
def test_a_card_moves_from_a_model_with_slots_to_spare_to_one_that_waits():
    # two cards each: the chats (12 requests in the fleet) wait for 8 slots, the other model uses 4 of 8
    fleet = fleet_of(A, A, B, B)
    demand = {A: Demand(running=8, waiting=4), B: Demand(running=4)}
    move = plan_move(fleet, demand)
    assert move is not None
    assert (move.agent, move.key, move.evicts) == ("c", A, (B,))  # c and d tie: the first id
    assert move.gain == pytest.approx(4.0)
    assert waiting(demand, {A: 12, B: 4}) == 0


def test_no_move_when_the_other_model_would_wait_as_much():
    fleet = fleet_of(A, A, B, B)
    assert plan_move(fleet, {A: Demand(running=8, waiting=1), B: Demand(running=6)}) is None  # B: 6 on 4
    # A's 3 waiting would go, B's 6.5 on 4 slots would leave 2.5 waiting: 0.5 fewer, not worth it
    assert plan_move(fleet, {A: Demand(running=8, waiting=3), B: Demand(running=6.5)}) is None
    # one fewer is (a quarter of the card's four slots, and one request)
    move = plan_move(fleet, {A: Demand(running=8, waiting=3), B: Demand(running=6)})
    assert move is not None and move.gain == pytest.approx(1.0)


def test_no_move_when_nothing_waits():
    fleet = fleet_of(A, A, B, B)
    assert plan_move(fleet, {A: Demand(running=7.5), B: Demand(running=1)}) is None
    assert plan_move(fleet, {}) is None


def test_no_move_to_a_model_with_nothing_in_the_queue_now():
    """Its average still says it waited (a burst just ended, or a client unloaded it after one):
    a load now would serve nobody, and would undo the unload."""
    fleet = fleet_of(A, A, B, B)
    demand = {A: Demand(running=8, waiting=4), B: Demand(running=4)}
    assert plan_move(fleet, demand, waiting_now={A: 0, B: 2}) is None
    assert plan_move(fleet, demand, waiting_now={B: 2}) is None
    move = plan_move(fleet, demand, waiting_now={A: 1})
    assert move is not None and move.key == A


def test_a_free_card_takes_a_waiting_model_without_a_margin():
    fleet = fleet_of(A, A, B, None)
    move = plan_move(fleet, {A: Demand(running=8, waiting=1), B: Demand(running=4)})
    assert move is not None and (move.agent, move.key, move.evicts) == ("d", A, ())
    assert move.gain == pytest.approx(1.0)


def test_a_model_keeps_its_last_card_and_a_pinned_one_every_card():
    demand = {A: Demand(running=12, waiting=10), B: Demand(running=1)}
    assert plan_move(fleet_of(A, A, A, B), demand) is None  # B is warm nowhere else
    assert plan_move(fleet_of(A, A, B, B), demand, pinned=frozenset({B})) is None
    assert plan_move(fleet_of(A, A, B, B), demand) is not None


def test_cards_that_cannot_switch_now_are_passed_over():
    demand = {A: Demand(running=8, waiting=4), B: Demand(running=4)}
    base = fleet_of(A, A, B, B)
    avoided = plan_move(base, demand, avoid=frozenset({"c"}))
    assert avoided is not None and avoided.agent == "d"
    c_key = parse_name("mistral").key  # a load of a third model under way there
    loading = [*base[:2], card("c", B, loading=(c_key,)), base[3]]
    assert (m := plan_move(loading, demand)) is not None and m.agent == "d"
    no_disk = [*base[:2], card("c", B, disk=(B,)), base[3]]  # the model is not on its disk
    assert (m := plan_move(no_disk, demand)) is not None and m.agent == "d"
    draining = [*base[:2], card("c", B, status="draining"), base[3]]
    # c is out of the fleet: B has only d, which it keeps
    assert plan_move(draining, demand) is None


def test_a_load_of_the_model_under_way_counts_as_its_slots():
    demand = {A: Demand(running=8, waiting=4), B: Demand(running=4)}
    # c is loading A already (its B still serves until the load evicts it): A's 12 in the fleet fit
    assert plan_move([*fleet_of(A, A), card("c", B, loading=(A,)), card("d", B)], demand) is None
    # a load of B under way does not make c B's card yet: d is B's only warm one, and B keeps it
    assert plan_move([*fleet_of(A, A), card("c", B, loading=(B,)), card("d", B)], demand) is None


def test_the_shorter_load_wins_a_tie():
    demand = {A: Demand(running=8, waiting=4), B: Demand(running=4)}
    fleet = [card("a", A), card("b", A), card("c", B, load_s={A: 9.0}), card("d", B, load_s={A: 2.0})]
    move = plan_move(fleet, demand)
    assert move is not None and move.agent == "d" and move.load_s == pytest.approx(2.0)


def test_the_most_waiting_model_gets_the_card():
    # a third model waits more than A does: the switch that helps most is to it
    c_key = parse_name("mistral").key
    NAMES[c_key] = "mistral:latest"
    try:
        fleet = [card(x, m, disk=(A, B, c_key)) for x, m in zip("abcde", (A, A, B, B, c_key), strict=True)]
        demand = {A: Demand(running=8, waiting=2), B: Demand(running=2), c_key: Demand(running=4, waiting=4)}
        move = plan_move(fleet, demand)
        assert move is not None and move.key == c_key and move.evicts == (B,)
    finally:
        del NAMES[c_key]


def test_the_share_of_its_slots_a_waiting_model_runs_is_what_a_slot_gives():
    # as measured under a steady load of short requests: 6 of the chats' 8 slots running, 2 waiting
    fleet = fleet_of(A, A, B, B)
    assert busy_shares({A: Demand(running=6, waiting=2)}, {A: 8}) == ({A: 0.75}, 0.75)
    move = plan_move(fleet, {A: Demand(running=6, waiting=2), B: Demand(running=1.4)})
    assert move is not None and move.gain == pytest.approx(2.0)  # 12 slots give 9: nothing waits
    # the donor is taken to run no more of its slots than the waiting model does: 3.5 on 4 × 0.75
    move = plan_move(fleet, {A: Demand(running=6, waiting=2), B: Demand(running=3.5)})
    assert move is not None and move.gain == pytest.approx(2.0 - 0.5)
    # requests that wait while nothing finishes (its slots held by endless streams) are floored
    assert busy_shares({A: Demand(running=0, waiting=5)}, {A: 8}) == ({A: 0.25}, 0.25)
    assert busy_shares({A: Demand(running=7, waiting=0.5)}, {A: 8}) == ({}, 1.0)  # hardly waits


@pytest.mark.parametrize("start", [(A, A, B, B), (A, B, B, B), (A, A, A, B), (A, B, None, None)])
def test_switches_at_one_demand_end_and_none_is_undone(start):
    # every demand on a grid, as the meter shows it on each allocation (what the slots run, the rest
    # waiting): follow the switches the rule makes until it makes none. Each must lower the waiting
    # by one request at least, no allocation may come back, and the run ends within the fleet's size
    switched = 0
    for a_total, b_total in itertools.product(range(0, 21, 2), range(0, 21, 2)):
        fleet = fleet_of(*start)
        seen = {_shape(fleet)}
        for _ in range(len(fleet) + 1):
            slots = _slots_of(fleet)
            demand = {
                k: Demand(min(t, slots.get(k, 0)), max(0, t - slots.get(k, 0)))
                for k, t in ((A, a_total), (B, b_total))
            }
            move = plan_move(fleet, demand)
            if move is None:
                break
            switched += 1
            fleet = moved(fleet, move.agent, move.key)
            assert waiting(demand, _slots_of(fleet)) <= waiting(demand, slots) - 1
            assert _shape(fleet) not in seen, (a_total, b_total, _shape(fleet))
            seen.add(_shape(fleet))
        else:
            pytest.fail(f"switches did not end at demand {a_total}/{b_total}")
    assert switched > 0  # the grid holds demands that move cards, whatever the start


def _shape(fleet: list[AgentState]) -> tuple[str | None, ...]:
    return tuple(x.loaded[0].name if x.loaded else None for x in fleet)


def _slots_of(fleet: list[AgentState]) -> dict[str, int]:
    slots: dict[str, int] = {}
    for a in fleet:
        for m in a.loaded:
            key = parse_name(m.name).key
            slots[key] = slots.get(key, 0) + a.parallel
    return slots


# -- replicas and demand -------------------------------------------------------------------------------
def test_a_replica_spares_the_slots_a_models_demand_needs():
    # A's backlog does not move (its one card's slots held): replicas may take B's cards, as many as
    # B's measured demand leaves it, never its last
    fleet = fleet_of(A, B, B, B)
    route = Route(key=A)

    def replicas(demand: dict[str, Demand] | None) -> tuple[str, ...]:
        return plan_replicas(route, fleet, 20, math.inf, fleet=fleet, demand=demand).load

    assert replicas(None) == ("b", "c")  # unmeasured: B keeps only its last card
    assert replicas({B: Demand(running=3)}) == ("b", "c")  # 3 running on the last card's 4
    assert replicas({B: Demand(running=6)}) == ("b",)  # 6 need two cards
    assert replicas({B: Demand(running=10)}) == ()  # 10 need all three
    assert replicas({B: Demand(running=4, waiting=2)}) == ()  # B's requests wait already


def test_a_replica_check_reads_the_same_with_the_slots_worked_out_once():
    # plan_replicas works the fleet's serving slots out once and hands them to every check
    fleet = [*fleet_of(A, B, B, B), card("e", B, parallel=2), card("f", None)]
    route, sizes = Route(key=A), Router().observations(fleet)[0]
    for running in (0, 3, 6, 10):
        demand = {B: Demand(running=running)}
        for a in fleet:
            plan, unloaded = load_plan(route, a, sizes), {("b", B)}
            for gone in (frozenset(), unloaded):
                alone = frees_for(a, plan, fleet, frozenset(), gone, demand=demand)
                given = frees_for(
                    a, plan, fleet, frozenset(), gone, demand=demand, serving=serving_slots(fleet)
                )
                assert alone == given, (a.id, running, gone)


def test_no_load_evicts_a_load_under_way():
    # c's B runner is listed while it loads: a load there would unload it before it served anything
    fleet = [card("a", A), card("b", B), card("c", B, loading=(B,)), card("d", B)]
    route = Route(key=A)
    assert "c" not in plan_replicas(route, fleet, 20, math.inf, fleet=fleet).load
    assert (m := plan_move(fleet, {A: Demand(running=4, waiting=8)})) is not None and m.agent != "c"


def test_serving_slots_count_warm_runners_at_the_default_context():
    fleet = [card("a", A), card("b", A, parallel=2), card("c", B, loading=(B,)), card("d", None)]
    assert serving_slots(fleet) == {A: 6}  # c's B is still loading
