"""The auto cost path makes each thing once: a cold load's plan once per agent and ranking, the
fleet's observations once per fleet snapshot, and `plan_replicas` reuses the plans it already made,
without changing a ranking."""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest
from corral.protocol.messages import AgentState, PsModel
from corral.routing import Route, Router, load_plan, plan_replicas
from corral.routing import memory as memory_module
from corral.routing import model as model_module
from corral.routing.memory import LoadPlan, observed_sizes

from tests.unit import qwen_fleet
from tests.unit.qwen_fleet import GB, GIB, MODEL, agent

OTHER = "phi3:mini"


def ps(name: str, size: int, ctx: int = 32768) -> PsModel:
    return qwen_fleet.ps(name, size, ctx)


@pytest.fixture
def planned(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Agent id → how many times a cold load was planned on it (`plan_load`)."""
    calls: Counter[str] = Counter()
    real = memory_module.plan_load

    def counting(key: str, size: int, agent: AgentState) -> LoadPlan:
        calls[agent.id] += 1
        return real(key, size, agent)

    monkeypatch.setattr(model_module, "plan_load", counting)
    return calls


def ids(agents: list[AgentState]) -> list[str]:
    return [a.id for a in agents]


def test_rank_plans_a_cold_load_once_per_cold_agent(planned: Counter[str]) -> None:
    fleet = [
        agent("warm", loaded=(ps(MODEL, 16 * GB),)),
        agent("loading", loading=True),
        agent("roomy"),
        agent("evicts", loaded=(ps(OTHER, 12 * GB),)),
        agent("cramped", vram=14 * GIB),  # the runner spills into system RAM
    ]
    order = Router().rank("auto", Route(MODEL), fleet, {})
    assert ids(order) == ["warm", "loading", "roomy", "evicts", "cramped"]
    assert planned == {"roomy": 1, "evicts": 1, "cramped": 1}  # none for the warm or loading agent


def test_plan_replicas_plans_each_spare_agent_once(planned: Counter[str]) -> None:
    # the serving runner reports no context, so it observes no size: every plan is at the estimate
    fleet = [agent("serving", loaded=(ps(MODEL, 16 * GB, ctx=0),), load_s=0.5)]
    fleet += [agent("s0"), agent("s1"), agent("full", vram=16 * GIB, loaded=(ps(OTHER, 4 * GB),))]
    plan = plan_replicas(Route(MODEL), fleet, depth=20, request_s=4.0)
    assert plan.candidates == ("s0", "s1") and plan.load == ("s0", "s1")
    assert planned == {"s0": 1, "s1": 1, "full": 1}  # "full" would evict: planned, not a candidate


def test_a_plan_made_for_another_loaded_size_is_not_reused() -> None:
    # planned on a runner size seen elsewhere (10 GB), "cramped" fits; by the estimate it does not
    cramped, roomy = agent("cramped", vram=14 * GIB), agent("roomy")
    seen = observed_sizes([agent("w", loaded=(ps(MODEL, 10 * GB),))])
    plans = {a.id: load_plan(Route(MODEL), a, seen) for a in (cramped, roomy)}
    assert plans["cramped"].full  # reused, this plan would tie "cramped" with "roomy" and put it first
    assert ids(Router().rank("auto", Route(MODEL), [cramped, roomy], {})) == ["roomy", "cramped"]
    assert ids(Router().rank("auto", Route(MODEL), [cramped, roomy], {}, plans=plans)) == ["roomy", "cramped"]


def test_a_plan_made_for_the_same_loaded_size_is_reused(planned: Counter[str]) -> None:
    fleet = [agent("cramped", vram=14 * GIB), agent("roomy")]
    plans = {a.id: load_plan(Route(MODEL), a) for a in fleet}
    planned.clear()
    assert ids(Router().rank("auto", Route(MODEL), fleet, {}, plans=plans)) == ["roomy", "cramped"]
    assert planned == {}


def test_observations_are_made_once_per_fleet_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[str] = Counter()
    sizes, loads = model_module.observed_sizes, model_module.observed_times
    monkeypatch.setattr(model_module, "observed_sizes", lambda a: calls.update(["sizes"]) or sizes(a))
    monkeypatch.setattr(model_module, "observed_times", lambda a: calls.update(["loads"]) or loads(a))
    fleet = [agent("a"), agent("b", load_s=3.0), agent("c")]
    router = Router()
    for _ in range(3):  # a new list of the same states each time, as a caller filters its fleet view
        router.rank("auto", Route(MODEL), list(fleet), {})
    assert calls == {"sizes": 1, "loads": 1}
    changed = [fleet[0], msgspec.structs.replace(fleet[1], load_s={}), fleet[2]]
    router.rank("auto", Route(MODEL), changed, {})
    router.rank("auto", Route(MODEL), list(reversed(changed)), {})  # another order: observed anew
    router.rank("auto", Route(MODEL), changed[:2], {})  # fewer agents: observed anew
    assert calls == {"sizes": 4, "loads": 4}


def test_a_changed_fleet_is_never_ranked_on_stale_observations() -> None:
    # "w" lists a 10 GB runner of the model: by that observation "cramped" takes the load in full
    cramped, roomy = agent("cramped", vram=14 * GIB), agent("roomy")
    w = agent("w", loaded=(ps(MODEL, 10 * GB),))
    router = Router()
    assert ids(router.rank("auto", Route(MODEL), [cramped, roomy, w], {})) == ["w", "cramped", "roomy"]
    # "w" let its runner go: the estimate (about 15.7 GB) spills on "cramped", which goes last
    fleet = [cramped, roomy, agent("w")]
    assert ids(router.rank("auto", Route(MODEL), fleet, {})) == ["roomy", "w", "cramped"]
    assert ids(router.rank("auto", Route(MODEL), fleet, {})) == ids(
        Router().rank("auto", Route(MODEL), fleet, {})
    )
