"""The auto cost path makes each thing once: a cold load's plan once per agent and ranking, the
fleet's observations once per fleet snapshot, without changing a ranking; `plan_replicas` ranks its
candidates on the observations its fit check used."""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest
from corral.protocol.messages import AgentState, PsModel
from corral.routing import Route, Router, plan_replicas
from corral.routing import memory as memory_module
from corral.routing import model as model_module
from corral.routing.memory import LoadPlan

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


def test_replica_candidates_are_ranked_on_what_every_holder_observed() -> None:
    # only the serving agent lists a runner of the model (10 GB at 32k): by it, "cramped" takes a
    # replica whole, as the fit check found; by the estimate alone (~15.7 GB) it would spill and
    # rank after "roomy"
    serving = agent("serving", loaded=(ps(MODEL, 10 * GB),))
    plan = plan_replicas(Route(MODEL), [serving, agent("roomy"), agent("cramped", vram=14 * GIB)], 20, 4.0)
    assert plan.candidates == ("cramped", "roomy")  # equal costs: by id


def test_a_replica_plan_reuses_the_callers_observations_of_the_same_holders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: Counter[str] = Counter()
    sizes, loads = model_module.observed_sizes, model_module.observed_times
    monkeypatch.setattr(model_module, "observed_sizes", lambda a: calls.update(["sizes"]) or sizes(a))
    monkeypatch.setattr(model_module, "observed_times", lambda a: calls.update(["loads"]) or loads(a))
    holders = [agent("serving", loaded=(ps(MODEL, 10 * GB),)), agent("roomy"), agent("b")]
    router = Router()
    request_s = router.observations(holders)[1].requests.get(MODEL, 4.0)  # as the registry reads it
    plan = plan_replicas(Route(MODEL), holders, 20, request_s, router=router)
    assert plan.candidates == ("b", "roomy")
    assert calls == {"sizes": 1, "loads": 1}  # the plan and its ranking used the same observations
