"""Rebalancing under a steady load: which card moves from one model to another, and when.

Replicas (`corral.routing.replicas`) answer a backlog as it forms. A steady load can leave a model
short of slots for good without one: its queue stays a few requests deep, each waits about one
request's time, no load could end before that queue drains, while another model's cards idle
beside it. Which model got which card was decided by whoever asked first when the card was free.

Over a longer look the fleet can tell, from each model's demand (`corral.routing.demand`: its
requests running and waiting, as moving averages, against what its slots run). `plan_move` looks
for the one card whose switch to a model whose requests wait — a load there that Ollama's fit rule
lets in, evicting only models that stay warm on another agent and are not pinned (`frees_for`) —
lowers the fleet's total of requests waiting (`waiting`) the most, by at least one request and
`MOVE_GAIN` of the card's slots. Taking a card from a model costs that model its slots there, so a
switch that leaves the other waiting as long gives nothing. The rule has hysteresis built in: at the
same demand and shares the reverse switch would raise the total by exactly what the switch lowered
it, so no switch is undone until demand changes, and a run of switches at one demand ends (each
lowers a total that cannot go below zero by at least one request).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from corral.protocol.messages import AgentState
from corral.protocol.names import key_of
from corral.routing.demand import SATURATED, Demand, busy_shares, waiting
from corral.routing.model import Router, load_plan, load_time
from corral.routing.replicas import frees_for
from corral.routing.route import Route, loading_for, serving_slots, warm

__all__ = ["MOVE_GAIN", "Move", "plan_move"]

# A switch must lower the requests waiting, on average, by at least this share of the card's slots
MOVE_GAIN: Final = 0.25


@dataclass(frozen=True, slots=True)
class Move:
    """One card's switch: load ``key`` on ``agent``, unloading ``evicts`` there."""

    agent: str
    key: str
    evicts: tuple[str, ...]
    gain: float  # requests waiting fewer on average, at the demand measured
    load_s: float  # how long the load is expected to take


def plan_move(
    fleet: Sequence[AgentState],
    demand: Mapping[str, Demand],
    *,
    pinned: frozenset[str] = frozenset(),
    avoid: frozenset[str] = frozenset(),
    min_gain: float = MOVE_GAIN,
    router: Router | None = None,
    waiting_now: Mapping[str, int] | None = None,
) -> Move | None:
    """The card switch to a model with requests waiting (`SATURATED`) that lowers `waiting` the
    most, or None when none lowers it by at least one request and ``min_gain`` of the card's slots.
    ``fleet``: every agent; ``pinned``: models kept warm (never evicted); ``avoid``: agents not to
    use now (a switch there failed lately); ``waiting_now``: each model's requests in the queue at
    this moment, when read: a model with none is not switched to, whatever its average says (its
    burst is over, or a client has just unloaded it: a load now would serve nobody). A load under
    way counts as the slots it will bring; an agent with one is not switched; ties go to the
    shorter load, then the agent id."""
    router = router or Router()
    active = [a for a in fleet if a.status == "active" and not a.ollama_down]
    serving = serving_slots(active)  # each model's slots on warm runners (what it ran on)
    slots = dict(serving)  # ... and on loads under way (soon warm)
    for a in active:
        for key in {k for k in a.loading if loading_for(Route(key=k), a)}:
            slots[key] = slots.get(key, 0) + _slots(a)
    shares, share = busy_shares(demand, serving)
    now = waiting(demand, slots, shares, share)
    best: Move | None = None
    for key, d in demand.items():
        if d.waiting < SATURATED or (waiting_now is not None and not waiting_now.get(key)):
            continue  # its requests hardly wait, or none waits now
        route = Route(key=key)
        holders = [a for a in active if any(key_of(m.name) == key for m in a.models)]
        sizes, loads = router.observations(holders)
        for a in holders:
            if a.id in avoid or a.loading or warm(route, a) or loading_for(route, a):
                continue
            plan = load_plan(route, a, sizes)
            if not frees_for(a, plan, active, pinned):
                continue
            after = dict(slots)
            after[key] = after.get(key, 0) + _slots(a)
            for k in plan.evicts:
                after[k] = after.get(k, 0) - _slots(a)
            gain = now - waiting(demand, after, shares, share)
            if gain < max(1.0, min_gain * _slots(a)):
                continue
            move = Move(a.id, key, plan.evicts, gain, load_time(route, a, loads))
            if best is None or (-move.gain, move.load_s, move.agent) < (-best.gain, best.load_s, best.agent):
                best = move
    return best


def _slots(agent: AgentState) -> int:
    return max(agent.parallel, 1)
