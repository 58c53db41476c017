"""Routing strategies: the order in which the agents holding a model are tried for one request.

Pure functions of a fleet snapshot (`AgentState`) and the caller's own count of outstanding sends:
no I/O, no clocks, no NATS. `Router.rank` takes the *holders* of the model (on disk or loaded;
active, not failed) and returns them best first; the caller walks that list until one claims the
request. Cost is O(holders) per call plus one sort of them; the fleet is never scanned.

Strategies (`STRATEGIES`; a config value or the ``X-Load-Balancing-Strategy`` header, see
`parse_strategy`):

``auto`` (default)
    Minimise the estimated time to first token (`estimate_ttft`): a free warm slot beats a queue,
    a queue shorter than a load beats a cold load, a runner loaded with the wrong ``num_ctx`` is
    reloaded only when nothing better exists, a cold load goes where the model fits in free VRAM,
    and a conversation returns to the agent holding its prompt cache unless that agent's wait is
    more than `SESSION_MAX_EXTRA_WAIT_S` worse than the best other (no hot-spotting).
``round_robin``
    Rotate over the holders sorted by id; one cursor per model, advanced once per call.
``random``
    A shuffle from the router's seeded generator.
``least_connection``
    Fewest requests per slot: (in_flight + queued + outstanding) / parallel.
``vram``
    Most free VRAM (all GPUs together) first.
``affinity``
    Loaded first, then loading, then on disk only; least busy first within each tier.

A vendor preference (``Route.vendor``) puts that vendor's agents first, each group keeping the
strategy's order; with ``Route.strict`` the other vendors are dropped instead. Ties are broken by
load, then by agent id, so every strategy but ``random`` is deterministic.

The auto cost model, in seconds (constants below)::

    loaded, matching num_ctx    queue_wait                       0 while a slot is free, else
                                                                 (busy - parallel + 1) * request / parallel
                                (+ offload share * CPU_DECODE_SLOWDOWN * request for a runner
                                partly in system RAM, on a GPU)
    loaded, other num_ctx       drain + load + CONTEXT_SWITCH_S  drain = busy * request / parallel
    loading                     LOADING_REMAINING * load + queue_wait
    on disk only                load + EVICTION_S per model Ollama unloads to make room
                                (+ drain when one of them has requests running: a thrash),
                                + OFFLOAD_S + offload share * CPU_DECODE_SLOWDOWN * request
                                when the model only fits partly in VRAM (`corral.routing.memory`)
    load                        as last observed on the agent or on one like it (same vendor and
                                GPUs, `corral.routing.loads`), else
                                LOAD_OVERHEAD_S + size / LOAD_BANDWIDTH (size: the model file)
    request                     seconds a request of the model holds a slot, as the agent or else
                                the fleet observed it (`corral.routing.loads`), else TYPICAL_REQUEST_S

    ttft = wait + PROMPT_EVAL_S (+ SESSION_REPLAY_S when the request continues a conversation and
           the agent cannot reuse its prompt cache)

``busy`` is the agent's in_flight + queued plus this caller's outstanding sends to it, since the
agent's published counts lag behind. Whether and how a cold load fits follows Ollama's own rule on
its estimate of the loaded size (weights + KV cache + graph, or an observed runner's size; see
`corral.routing.memory`). ``auto`` ranks agents where a cold load would evict a busy model or
spill into system RAM after every agent where it would not (never thrash, prefer full fits).
"""

from __future__ import annotations

import operator
import random
from collections.abc import Mapping, Sequence, Set
from typing import Final

from corral.protocol.messages import AgentState
from corral.protocol.names import VENDORS
from corral.protocol.runners import spilled_share
from corral.routing.loads import (
    DEFAULT_MODEL_SIZE,
    LOAD_BANDWIDTH,
    LOAD_OVERHEAD_S,
    ObservedTimes,
    estimated_load_s,
    file_size,
    observed_load_s,
    observed_times,
    request_time,
)
from corral.routing.memory import (
    LoadPlan,
    ObservedSizes,
    estimate_size,
    observed_sizes,
    plan_load,
    with_loads,
)
from corral.routing.route import Route, loading_for, ready_runner, runner_matches, vram_free, wanted_ctx

__all__ = [
    "CONTEXT_SWITCH_S",
    "CPU_DECODE_SLOWDOWN",
    "DEFAULT_MODEL_SIZE",
    "DEFAULT_STRATEGY",
    "EVICTION_S",
    "LOADING_REMAINING",
    "LOAD_BANDWIDTH",
    "LOAD_OVERHEAD_S",
    "OFFLOAD_S",
    "PROMPT_EVAL_S",
    "SESSION_MAX_EXTRA_WAIT_S",
    "SESSION_REPLAY_S",
    "STRATEGIES",
    "Router",
    "as_placed",
    "estimate_ttft",
    "estimate_wait",
    "expected_waits",
    "fits",
    "load",
    "load_time",
    "load_plan",
    "parse_strategy",
    "slots_taken",
]

STRATEGIES: Final = ("auto", "round_robin", "random", "least_connection", "vram", "affinity")
DEFAULT_STRATEGY: Final = "auto"

# -- the auto cost model -------------------------------------------------------------------------
# Loading: `corral.routing.loads` (LOAD_BANDWIDTH, LOAD_OVERHEAD_S, DEFAULT_MODEL_SIZE).
# Share of a load still ahead when one is already under way (its start time is not published).
LOADING_REMAINING: Final = 0.5
# Unloading a model to make room, on top of waiting for the agent's running requests to drain.
EVICTION_S: Final = 2.0
# Reloading a runner with another num_ctx also evicts it from everyone using it at its current
# context: charged on top of the reload so models are not thrashed between contexts.
CONTEXT_SWITCH_S: Final = 5.0
# A partial offload: the fixed penalty, and how many times slower a fully offloaded model decodes.
OFFLOAD_S: Final = 10.0
CPU_DECODE_SLOWDOWN: Final = 10.0
# Prompt evaluation of a request that starts on a free slot.
PROMPT_EVAL_S: Final = 0.1
# Extra prompt evaluation a follow-up turn pays on an agent that does not hold the conversation's
# prompt cache (it re-reads the history). The session agent's bonus.
SESSION_REPLAY_S: Final = 1.5
# The session agent keeps its bonus only while its wait is at most this much longer than the best
# other agent's; beyond it the conversation moves rather than piling onto one agent.
SESSION_MAX_EXTRA_WAIT_S: Final = 1.0


def parse_strategy(value: str) -> tuple[str | None, str | None]:
    """Map a strategy setting (config or ``X-Load-Balancing-Strategy``) to ``(strategy, vendor)``.

    A strategy name gives ``(name, None)``; a vendor (``nvidia``, ``amd``, ``intel``, ``apple``,
    ``cpu``) is a preference under the default strategy: ``(None, vendor)``. Case-insensitive,
    ``-`` may stand for ``_``; an empty value is ``(None, None)``. Raises `ValueError` otherwise.
    """
    v = value.strip().lower().replace("-", "_")
    if not v:
        return None, None
    if v in STRATEGIES:
        return v, None
    if v in VENDORS:
        return None, v
    raise ValueError(
        f"unknown load-balancing strategy {value!r}; valid values: {', '.join(STRATEGIES + VENDORS)}"
    )


# -- per-agent measures --------------------------------------------------------------------------


def load(agent: AgentState, outstanding: Mapping[str, int]) -> float:
    """Requests per slot: (in_flight + queued + outstanding) / parallel."""
    return _busy(agent, outstanding) / max(agent.parallel, 1)


def slots_taken(
    agents: Sequence[AgentState], outstanding: Mapping[str, int], full: Set[str]
) -> Mapping[str, int]:
    """``outstanding`` with every slot the agents named in ``full`` show free counted as taken: they
    answered that they have none, which is newer than the counts they publish (those lag by their
    pacing and leave out other senders' requests)."""
    out: dict[str, int] | None = None
    for a in agents:
        free = max(a.parallel, 1) - _busy(a, outstanding)
        if free > 0 and a.id in full:
            out = out if out is not None else dict(outstanding)
            out[a.id] = out.get(a.id, 0) + free
    return outstanding if out is None else out


def estimate_wait(
    route: Route,
    agent: AgentState,
    outstanding: Mapping[str, int],
    observed: ObservedSizes | None = None,
    loads: ObservedTimes | None = None,
) -> float:
    """Seconds until ``agent`` could start ``route``'s request: queue, load or reload (no prompt
    eval). ``observed``: runner sizes seen in the fleet (`observed_sizes`); ``loads``: load times
    seen in the fleet (`observed_times`; the agent's own are used without it)."""
    plan = _cold_plan(route, agent, observed or {})
    return _estimate(route, agent, outstanding, loads or ObservedTimes(), plan)[0]


def expected_waits(route: Route | None, agents: Sequence[AgentState], outstanding: Mapping[str, int]) -> str:
    """For a debug line: each agent's expected wait for ``route`` (its load, for a call of no model)."""
    if route is None:
        return ", ".join(f"{a.id} load {load(a, outstanding):.2f}" for a in agents) or "none"
    return ", ".join(f"{a.id} {estimate_wait(route, a, outstanding):.3f}s" for a in agents) or "none"


def estimate_ttft(
    route: Route,
    agent: AgentState,
    outstanding: Mapping[str, int],
    observed: ObservedSizes | None = None,
    loads: ObservedTimes | None = None,
) -> float:
    """Estimated seconds to the first token of ``route``'s request on ``agent``, taken alone.

    The session agent's prompt-cache bonus is included here unconditionally; `Router.rank`
    withdraws it when that agent waits too much longer than the others.
    """
    plan = _cold_plan(route, agent, observed or {})
    wait, cached = _estimate(route, agent, outstanding, loads or ObservedTimes(), plan)
    return (
        wait + PROMPT_EVAL_S + (SESSION_REPLAY_S if route.session_agent is not None and not cached else 0.0)
    )


def _busy(agent: AgentState, outstanding: Mapping[str, int]) -> int:
    return agent.in_flight + agent.queued + outstanding.get(agent.id, 0)


def _estimate(
    route: Route,
    agent: AgentState,
    outstanding: Mapping[str, int],
    loads: ObservedTimes,
    plan: LoadPlan | None,
) -> tuple[float, bool]:
    """(wait, whether the agent's warm runner holds this conversation's prompt cache). ``plan``:
    `_cold_plan` of the same agent (None where the model is loaded or loading there)."""
    busy = _busy(agent, outstanding)
    load_s = load_time(route, agent, loads)
    request_s = request_time(route.key, agent, loads)
    parallel = max(agent.parallel, 1)
    runner = ready_runner(agent, route.key)
    if runner is not None:
        if runner_matches(route, agent, runner):
            spilled = spilled_share(runner.size, runner.size_vram, on_gpu=agent.vendor != "cpu")
            wait = _queue_wait(busy, parallel, request_s) + spilled * CPU_DECODE_SLOWDOWN * request_s
            return wait, route.session_agent == agent.id
        drain = busy * request_s / parallel
        return drain + load_s + CONTEXT_SWITCH_S, False
    if route.key in agent.loading:
        remaining = LOADING_REMAINING * load_s + _queue_wait(busy, parallel, request_s)
        if loading_for(route, agent):
            return remaining, False
        # loading for another context: that load, then a reload for this one
        return remaining + load_s + CONTEXT_SWITCH_S, False
    assert plan is not None, "a cold load is planned wherever the model is neither loaded nor loading"
    wait = load_s + EVICTION_S * len(plan.evicts)
    if plan.thrashes:
        wait += busy * request_s / parallel
    if not plan.full:
        wait += OFFLOAD_S + plan.offload * CPU_DECODE_SLOWDOWN * request_s
    return wait, False


def load_plan(route: Route, agent: AgentState, observed: ObservedSizes | None = None) -> LoadPlan:
    """How a cold load of ``route``'s model lands on ``agent`` by Ollama's fit rule, on the
    estimated loaded size (``observed``: runner sizes seen in the fleet, `observed_sizes`)."""
    return plan_load(route.key, _loaded_size(route, agent, observed or {}), agent)


def as_placed(agents: Sequence[AgentState], placed: Mapping[str, Sequence[Route]]) -> list[AgentState]:
    """``agents`` with the loads a placer sent them moments ago (``placed``: agent id → routes)
    counted as under way (`corral.routing.memory.with_loads`, each at its `load_plan` size): a
    placer decides faster than agents publish, and the next cold load must see that memory taken."""
    return [
        with_loads(a, [(r.key, r.num_ctx or 0, load_plan(r, a).size) for r in placed[a.id]])
        if a.id in placed
        else a
        for a in agents
    ]


def _loaded_size(route: Route, agent: AgentState, observed: ObservedSizes) -> int:
    ctx = wanted_ctx(route.key, route.num_ctx, agent)
    return estimate_size(route.key, ctx, _size(route, agent), agent, observed)


def _cold_plan(route: Route, agent: AgentState, observed: ObservedSizes) -> LoadPlan | None:
    """`load_plan` where ``route``'s request needs a cold load on ``agent`` (no runner of the model,
    no load of it under way); None elsewhere."""
    if ready_runner(agent, route.key) is not None or route.key in agent.loading:
        return None
    return plan_load(route.key, _loaded_size(route, agent, observed), agent)


def _queue_wait(busy: int, parallel: int, request_s: float) -> float:
    if busy < parallel:
        return 0.0
    return (busy - parallel + 1) * request_s / parallel


def load_time(route: Route, agent: AgentState, loads: ObservedTimes | None = None) -> float:
    """Seconds a load of ``route``'s model takes on ``agent`` (no eviction): as last observed there
    or on an agent like it (``loads``: `observed_times` of the fleet), else by the cost model's
    estimate at the pace the agent's (or the fleet's) observed loads show."""
    seen = observed_load_s(route.key, agent, loads)
    if seen is not None:
        return seen
    estimate = estimated_load_s(_size(route, agent))
    return estimate * loads.pace_of(agent) if loads is not None else estimate


def fits(route: Route, agent: AgentState, observed: ObservedSizes | None = None) -> bool:
    """``route``'s model loads on ``agent`` entirely in VRAM without evicting anything."""
    plan = load_plan(route, agent, observed)
    return plan.full and not plan.evicts


def _size(route: Route, agent: AgentState) -> int:
    """The model file's size: what a load reads from disk (the weights)."""
    return route.model_size if route.model_size > 0 else file_size(route.key, agent)


# -- ranking -------------------------------------------------------------------------------------


class Router:
    """Ranks holders of a model under a strategy; keeps the state strategies carry between calls."""

    __slots__ = ("_cursors", "_observed", "_random")

    def __init__(self, *, seed: int | None = None) -> None:
        self._cursors: dict[str, int] = {}  # model key → round-robin turn
        self._random = random.Random(seed)
        # the agents ``auto`` last ranked, with the runner sizes and load times they observed
        self._observed: tuple[tuple[AgentState, ...], ObservedSizes, ObservedTimes] | None = None

    def rank(
        self,
        strategy: str,
        route: Route,
        agents: Sequence[AgentState],
        outstanding: Mapping[str, int],
        pinned: frozenset[str] = frozenset(),
        *,
        observed_in: Sequence[AgentState] | None = None,
    ) -> list[AgentState]:
        """``agents`` (the model's usable holders) in the order to try them, best first.

        With ``route.strict`` only ``route.vendor``'s agents are returned. ``pinned``: model keys
        kept warm, which ``auto`` spares from eviction as it spares busy ones. ``observed_in``:
        the agents whose runners and loads ``auto`` learns sizes and load times from (default
        ``agents``; more when ``agents`` is a subset of the model's holders). Raises `ValueError`
        for an unknown strategy.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
        first, rest = _by_vendor(route, agents)
        if not first and not rest:
            return []
        if strategy == "round_robin":
            turn = self._cursors.get(route.key, 0)
            self._cursors[route.key] = turn + 1
            return _rotated(first, turn) + _rotated(rest, turn)
        if strategy == "random":
            self._random.shuffle(first)
            self._random.shuffle(rest)
            return first + rest
        if strategy == "least_connection":

            def key(a: AgentState) -> tuple[float, str]:
                return load(a, outstanding), a.id

            return sorted(first, key=key) + sorted(rest, key=key)
        if strategy == "vram":

            def vram_key(a: AgentState) -> tuple[int, float, str]:
                return -(vram_free(a) or 0), load(a, outstanding), a.id

            return sorted(first, key=vram_key) + sorted(rest, key=vram_key)
        if strategy == "affinity":

            def tier_key(a: AgentState) -> tuple[int, float, str]:
                tier = 0 if ready_runner(a, route.key) is not None else 1 if route.key in a.loading else 2
                return tier, load(a, outstanding), a.id

            return sorted(first, key=tier_key) + sorted(rest, key=tier_key)
        observed, loads = self.observations(agents if observed_in is None else observed_in)
        planned = [(a, _cold_plan(route, a, observed)) for a in first + rest]
        costs = _auto_costs(route, planned, outstanding, loads)
        last = _last_resorts(planned, pinned)

        def cost_key(a: AgentState) -> tuple[bool, float, float, int, str]:
            # equal cost and load: the agent with more slots (it will absorb more of what follows)
            return a.id in last, costs[a.id], load(a, outstanding), -a.parallel, a.id

        return sorted(first, key=cost_key) + sorted(rest, key=cost_key)

    def observations(self, agents: Sequence[AgentState]) -> tuple[ObservedSizes, ObservedTimes]:
        """`observed_sizes` and `observed_times` of ``agents``, made again only when they are not
        the very states of the last call, in the same order. A state is a frozen message, never
        changed once made (a change arrives as a new state), so the same states observe the same;
        the last ones are held, so an ``is`` match is never a recycled object."""
        last = self._observed
        if last is not None and len(last[0]) == len(agents) and all(map(operator.is_, last[0], agents)):
            return last[1], last[2]
        snapshot = tuple(agents)
        observed, loads = observed_sizes(snapshot), observed_times(snapshot)
        self._observed = (snapshot, observed, loads)
        return observed, loads


def _by_vendor(route: Route, agents: Sequence[AgentState]) -> tuple[list[AgentState], list[AgentState]]:
    """(preferred vendor's agents, the others); the others are empty under strict or no preference."""
    if route.vendor is None:
        return list(agents), []
    first = [a for a in agents if a.vendor == route.vendor]
    return first, [a for a in agents if a.vendor != route.vendor and route.admits(a.vendor)]


def _rotated(group: list[AgentState], turn: int) -> list[AgentState]:
    if not group:
        return group
    group.sort(key=lambda a: a.id)
    i = turn % len(group)
    return group[i:] + group[:i]


def _last_resorts(planned: list[tuple[AgentState, LoadPlan | None]], pinned: frozenset[str]) -> set[str]:
    """Agents where a cold load (``planned``: each agent with its `_cold_plan`) would evict a busy
    or pinned model or spill into system RAM, when some other agent can serve without either
    (warm, loading, or a full fit evicting only idle models)."""
    bad = {
        a.id
        for a, plan in planned
        if plan is not None and (plan.thrashes or not plan.full or not pinned.isdisjoint(plan.evicts))
    }
    return bad if len(bad) < len(planned) else set()


def _auto_costs(
    route: Route,
    planned: list[tuple[AgentState, LoadPlan | None]],
    outstanding: Mapping[str, int],
    loads: ObservedTimes,
) -> dict[str, float]:
    """Agent id → estimated time to first token, with the session bonus bounded (no hot-spotting).
    ``planned``: each agent with its `_cold_plan`."""
    session = route.session_agent
    replay = SESSION_REPLAY_S if session is not None else 0.0
    costs: dict[str, float] = {}
    session_wait: float | None = None
    best_other = float("inf")
    for a, plan in planned:
        wait, cached = _estimate(route, a, outstanding, loads, plan)
        if cached:
            session_wait = wait
        else:
            costs[a.id] = wait + PROMPT_EVAL_S + replay
            best_other = min(best_other, wait)
    if session is not None and session_wait is not None:
        keeps_bonus = session_wait <= best_other + SESSION_MAX_EXTRA_WAIT_S
        costs[session] = session_wait + PROMPT_EVAL_S + (0.0 if keeps_bonus else replay)
    return costs
