"""The fleet's views as a key may see them (``CORRAL_AUTH=keys``): only the models its allow-list
allows, and for a user key no backend addresses — no ``ollama_url`` or ``host`` of any agent, so
nobody can reach a backend past the gateway. An admin key with no allow-list sees what everyone
sees with keys off."""

from __future__ import annotations

from typing import Any

import msgspec
from corral import views
from corral.gateway.access import ApiKey, model_allowed
from corral.protocol.messages import AgentState
from corral.views.status import Pin

_enc = msgspec.json.Encoder()
_HIDDEN = ("host", "ollama_url")  # what a user key never sees of an agent


def _ok(key: ApiKey, name: str) -> bool:
    return model_allowed(key.models, name)


def tags_body(agents: list[AgentState], key: ApiKey | None) -> bytes:
    if key is None or not key.models:
        return views.tags_body(agents)
    return _enc.encode({"models": [m for m in views.merged_tags(agents) if _ok(key, m.name)]})


def ps_body(agents: list[AgentState], key: ApiKey | None) -> bytes:
    if key is None or (key.admin and not key.models):
        return views.ps_body(agents)
    rows = msgspec.to_builtins([r for r in views.merged_ps(agents) if _ok(key, r.name)])
    if not key.admin:
        for row in rows:
            for field in _HIDDEN:
                row["corral"].pop(field, None)
    return _enc.encode({"models": rows})


def v1_models_body(agents: list[AgentState], key: ApiKey | None) -> bytes:
    if key is None or not key.models:
        return views.v1_models_body(agents)
    return views.v1_models_body([_only_allowed(a, key) for a in agents])


def _only_allowed(agent: AgentState, key: ApiKey) -> AgentState:
    return msgspec.structs.replace(
        agent,
        models=[m for m in agent.models if _ok(key, m.name)],
        loaded=[m for m in agent.loaded if _ok(key, m.name)],
    )


def status_body(
    agents: list[AgentState],
    rates: views.Rates | None,
    queue: dict[str, int],
    key: ApiKey | None,
    pins: dict[str, Pin] | None = None,
    nats_away_s: float | None = None,
) -> bytes:
    if key is None or (key.admin and not key.models):
        return views.status_body(agents, rates, queue, pins, nats_away_s)
    if key.models:
        agents = [_only_allowed(a, key) for a in agents]
        queue = {m: n for m, n in queue.items() if _ok(key, m)}
        pins = {m: p for m, p in (pins or {}).items() if _ok(key, m)}
    view = views.status_view(agents, rates, queue=queue, pins=pins, nats_away_s=nats_away_s)
    status: dict[str, Any] = msgspec.to_builtins(view)
    if not key.admin:
        for row in status["agents"]:
            for field in _HIDDEN:
                row.pop(field, None)
    if key.models and status.get("rates"):
        per_model = status["rates"].get("per_model", {})
        status["rates"]["per_model"] = {m: r for m, r in per_model.items() if _ok(key, m)}
    return _enc.encode(status)
