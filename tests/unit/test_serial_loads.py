"""Ollama loads one model at a time: a cold load placed where another model is loading waits for
it, and `auto` knows (the "other loads ahead" term of its cost model)."""

from __future__ import annotations

import msgspec
from corral.protocol.messages import AgentState, TagModel
from corral.routing import LOADING_REMAINING, Route, Router, estimate_wait
from corral.routing.model import load_time

from tests.unit.test_routing import GB, MODEL, OTHER, agent


def busy_loading(agent_id: str, *others: str) -> AgentState:
    """An agent with MODEL and ``others`` on disk, loading ``others`` now."""
    a = agent(agent_id)
    disk = a.models + tuple(
        TagModel(name=o, model=o, modified_at="", size=4 * GB, digest="d") for o in others
    )
    return msgspec.structs.replace(a, models=disk, loading=others)


def test_a_cold_load_waits_for_what_is_left_of_the_other_loads_under_way() -> None:
    route = Route(key=MODEL)
    idle, loading = agent("idle"), busy_loading("loading", OTHER)
    other = load_time(Route(key=OTHER), loading)
    assert estimate_wait(route, loading, {}) == estimate_wait(route, idle, {}) + LOADING_REMAINING * other
    two = busy_loading("two", OTHER, "mistral:7b")
    assert estimate_wait(route, two, {}) > estimate_wait(route, loading, {})
    assert Router().rank("auto", route, [loading, idle], {})[0].id == "idle"


def test_a_reload_for_another_context_waits_for_them_too() -> None:
    route = Route(key=MODEL, num_ctx=8192)
    warm = agent("warm", loaded=True, ctx=2048)
    disk = warm.models + (TagModel(name=OTHER, model=OTHER, modified_at="", size=4 * GB, digest="d"),)
    behind = msgspec.structs.replace(warm, models=disk, loading=(OTHER,))
    other = load_time(Route(key=OTHER), behind)
    assert estimate_wait(route, behind, {}) == estimate_wait(route, warm, {}) + LOADING_REMAINING * other


def test_the_model_s_own_load_under_way_is_not_a_load_ahead_of_it() -> None:
    route = Route(key=MODEL)
    mine = msgspec.structs.replace(agent("mine"), loading=(MODEL,))
    assert estimate_wait(route, mine, {}) < estimate_wait(route, agent("cold"), {})  # half a load left
