"""Demand-driven replicas: how many more loads a model's backlog needs, and on which agents.

Pure functions of a fleet snapshot (`AgentState`): no I/O, no clocks (times are passed in).

A model's backlog — its requests waiting in the fleet queue — drains on the slots that serve the
model and, once their loads end, on the slots loading it. `drain_s` says when the last waiting
request would start: every slot takes a request when it is free and another every ``request_s``
(the queue forms only when every warm slot is taken, so a serving slot frees after about one
request; a load under way is taken to be `LOADING_REMAINING` from its end). A replica elsewhere
helps only if its load ends before that. `plan_replicas` walks the candidates — active agents with
the model on disk where it fits in free VRAM without evicting anything (`load_plan`), or once
Ollama lets go of models there that another agent of the fleet also has loaded (`frees_for`: their
requests keep a place, and the agent turns them away while the load is under way; a model loaded
nowhere else, pinned, loading there or, by its measured demand, needing the slots, is never
evicted), cheapest first by the router (whose costs put an eviction after none, and a busy model's
after an idle one's) — and takes each one whose load (as observed there or on an agent like it,
else estimated: `load_time`) ends before the backlog, with the replicas already taken, would have
drained; it stops once the backlog has a slot for every
``backlog_per_slot`` waiting requests (serving slots count only while they free: a backlog that has
not moved, ``request_s`` infinite, is waiting on requests that may never end). So fast loads and a
deep backlog load several replicas at once, a backlog that drains before a load could end loads
none, loads under way count, a request stuck behind endless streams gets a replica where one fits,
and no backlog gets a load per waiting request. With nothing serving or loading the model there is no
plan: the first load is the placement's (the request that finds the model cold starts it).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Final

from corral.protocol.messages import AgentState
from corral.routing.demand import Demand, spares
from corral.routing.memory import LoadPlan
from corral.routing.model import LOADING_REMAINING, Router, load_plan, load_time
from corral.routing.route import Route, loading_for, serving_slots, warm

__all__ = ["BACKLOG_PER_SLOT", "ReplicaPlan", "drain_s", "frees_for", "plan_replicas"]

# A backlog gets at most one slot (serving, loading or to load) per this many waiting requests.
BACKLOG_PER_SLOT: Final = 2.0


@dataclass(frozen=True, slots=True)
class ReplicaPlan:
    """What `plan_replicas` decided for one model's backlog."""

    load: tuple[str, ...] = ()  # agents to load the model on now, best first
    depth: int = 0  # requests waiting
    drain_s: float = math.inf  # when the backlog would drain without them
    slots: int = 0  # slots that will take the backlog before them: loading, and serving ones that free
    load_s: float = math.inf  # the shortest load of the model among the agents looked at
    candidates: tuple[str, ...] = ()  # agents where a load fits, cheapest first


def drain_s(depth: int, groups: Iterable[tuple[float, int]], request_s: float) -> float:
    """Seconds until the ``depth``-th waiting request starts on slot ``groups`` — (seconds until
    free, slots) — where each slot takes a request when free and another every ``request_s``
    (``inf``: a slot takes one and is never seen free again); ``inf`` when they never get there."""
    if depth <= 0:
        return 0.0
    heap = [(ready, n) for ready, n in groups if n > 0 and math.isfinite(ready)]
    if not heap:
        return math.inf
    if request_s <= 0:
        return min(ready for ready, _ in heap)  # a slot takes any number at once
    heapq.heapify(heap)
    started = 0
    while heap:
        ready, n = heapq.heappop(heap)
        started += n
        if started >= depth:
            return ready
        if math.isfinite(request_s):
            heapq.heappush(heap, (ready + request_s, n))
    return math.inf


def plan_replicas(
    route: Route,
    holders: Sequence[AgentState],
    depth: int,
    request_s: float,
    *,
    starting: frozenset[str] = frozenset(),
    pinned: frozenset[str] = frozenset(),
    backlog_per_slot: float = BACKLOG_PER_SLOT,
    router: Router | None = None,
    fleet: Sequence[AgentState] = (),
    demand: Mapping[str, Demand] | None = None,
) -> ReplicaPlan:
    """The replicas ``depth`` requests waiting for ``route``'s model need now.

    ``holders``: the active agents with the model on disk (the candidates, and those serving or
    loading it); ``request_s``: seconds one request holds a slot; ``starting``: agents a load was
    sent to that may not show it yet (they count as loading); ``pinned``: models kept warm;
    ``router``: the caller's, whose observations of these very ``holders`` are reused; ``fleet``:
    every agent, to tell an idle model a load would evict from a holder is loaded elsewhere too;
    ``demand``: each model's measured demand (`corral.routing.demand`), when known: a model is not
    evicted from slots its demand needs.
    """
    router = router or Router()
    sizes, loads = router.observations(holders)
    in_use = serving_slots(fleet) if demand else None  # once, for every candidate's `frees_for`
    serving: list[AgentState] = []
    loading: list[AgentState] = []
    spare: list[AgentState] = []
    plans: dict[str, LoadPlan] = {}  # a candidate's load, by Ollama's fit rule (made once)
    for a in holders:
        if warm(route, a):
            serving.append(a)
        elif loading_for(route, a) or a.id in starting:
            loading.append(a)
        elif frees_for(
            a,
            plans.setdefault(a.id, load_plan(route, a, sizes)),
            fleet,
            pinned,
            demand=demand,
            serving=in_use,
        ):
            spare.append(a)  # entirely in VRAM
    ranked = router.rank("auto", route, spare, {}, pinned, observed_in=holders)
    ready_s = {a.id: load_time(route, a, loads) for a in [*loading, *ranked]}
    groups = [(request_s, _slots(a)) for a in serving]
    groups += [(LOADING_REMAINING * ready_s[a.id], _slots(a)) for a in loading]
    # slots that will take the backlog: serving ones only if they free (``request_s`` finite: with
    # its requests of unknown length, a backlog that has not moved may never see them free)
    slots = sum(_slots(a) for a in loading) + (
        sum(_slots(a) for a in serving) if math.isfinite(request_s) else 0
    )
    load_s = min(ready_s.values(), default=math.inf)
    before = drain_s(depth, groups, request_s)
    plan = ReplicaPlan(
        depth=depth, drain_s=before, slots=slots, load_s=load_s, candidates=tuple(a.id for a in ranked)
    )
    if not serving and not loading:
        return plan  # the first load is the placement's
    chosen: list[str] = []
    evicting: set[tuple[str, str]] = set()  # (agent, model) the chosen loads unload
    for a in ranked:
        if slots >= depth / backlog_per_slot:
            break
        ready = ready_s[a.id]
        unloads = {(a.id, k) for k in plans[a.id].evicts}
        if unloads and not frees_for(
            a, plans[a.id], fleet, pinned, evicting | unloads, demand=demand, serving=in_use
        ):
            continue  # another chosen load unloads the copy it counted on
        if ready < drain_s(depth, groups, request_s):  # ready before the backlog is gone
            evicting |= unloads
            chosen.append(a.id)
            groups.append((ready, _slots(a)))
            slots += _slots(a)
    return dataclasses.replace(plan, load=tuple(chosen))


def frees_for(
    agent: AgentState,
    plan: LoadPlan,
    fleet: Sequence[AgentState],
    pinned: frozenset[str],
    unloaded: Set[tuple[str, str]] = frozenset(),
    *,
    demand: Mapping[str, Demand] | None = None,
    serving: Mapping[str, int] | None = None,
) -> bool:
    """The load ``plan`` puts the model entirely in ``agent``'s VRAM, evicting nothing or only
    models that another agent of ``fleet`` also has loaded (so a request for one still finds a
    runner; not a copy ``unloaded`` lists, (agent, model) that other loads of the plan unload), none
    pinned, none loading there (its load would be lost), and — with ``demand`` — none whose
    measured demand needs the slots it would lose (`corral.routing.demand.spares`): a backlog may
    take memory such models keep warm twice. A busy one among them finishes its requests here first
    (Ollama waits for them), and the agent sends it no more meanwhile. ``serving``: `serving_slots`
    of ``fleet``, when the caller asks of many agents at one demand (else worked out here)."""
    if not plan.full:
        return False
    if any(k in agent.loading for k in plan.evicts):
        return False
    if demand and plan.evicts:
        serving = serving_slots(fleet) if serving is None else serving
        ids = {i for i, _ in unloaded}
        slots_of = {o.id: _slots(o) for o in fleet if o.id in ids} if ids else {}
    else:
        serving, slots_of = {}, {}
    return all(
        k not in pinned
        and any(o.id != agent.id and (o.id, k) not in unloaded and warm(Route(key=k), o) for o in fleet)
        and (
            not demand
            or spares(
                demand,
                serving,
                k,
                _slots(agent) + sum(slots_of.get(i, 0) for i, m in unloaded if m == k and i != agent.id),
            )
        )
        for k in plan.evicts
    )


def _slots(agent: AgentState) -> int:
    return max(agent.parallel, 1)
