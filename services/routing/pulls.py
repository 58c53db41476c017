"""Where a pull goes: the one placement rule for ``/api/pull``, shared by the registry and by a
gateway that finds no registry running."""

from __future__ import annotations

from collections.abc import Iterable

from corral.protocol.messages import AgentState
from corral.protocol.names import key_of

__all__ = ["has_model", "pull_order"]


def has_model(agent: AgentState, key: str) -> bool:
    """``agent`` has the model ``key`` on disk (names without a key count for no model)."""
    return any(key_of(m.name) == key for m in agent.models)


def pull_order(agents: Iterable[AgentState], key: str, vendor: str | None) -> list[AgentState]:
    """Where a pull of ``key`` should go, best first: active agents (of ``vendor``) that already have
    the model (a pull there only checks), then those with the fewest models; ties by agent id. An
    agent whose Ollama does not answer is none of them (it shows no models, so it would come first)."""
    usable = [a for a in agents if a.status == "active" and not a.ollama_down and vendor in (None, a.vendor)]
    usable.sort(key=lambda a: (not has_model(a, key), len(a.models), a.id))
    return usable
