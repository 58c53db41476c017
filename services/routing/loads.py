"""How long a load of a model takes on an agent: as observed there, or on agents like it.

Pure functions of fleet snapshots (`AgentState`). Each agent publishes how long its last load of
each model took (``AgentState.load_s``, measured from Ollama's replies). An agent that has not
loaded the model yet is taken to load it as fast as an agent like it did — same vendor and same
GPUs (`hardware`) — the slowest such agent counting; where no such load was seen the caller falls
back on the cost model's estimate (size / bandwidth, `corral.routing.load_time`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from corral.protocol.messages import AgentState

__all__ = ["ObservedLoads", "hardware", "observed_load_s", "observed_loads"]

# (model key, `hardware` of the agents) → seconds a load of the model took on such an agent
ObservedLoads = Mapping[tuple[str, tuple[str, ...]], float]


def hardware(agent: AgentState) -> tuple[str, ...]:
    """What a load's speed depends on besides the model, as far as an agent says: its vendor and
    the names of its GPUs (the disk is not published)."""
    return (agent.vendor, *sorted(g.name for g in agent.gpus))


def observed_loads(agents: Iterable[AgentState]) -> dict[tuple[str, tuple[str, ...]], float]:
    """The loads the agents observed, by model and hardware (the slowest where several did)."""
    seen: dict[tuple[str, tuple[str, ...]], float] = {}
    for a in agents:
        for key, seconds in a.load_s.items():
            if seconds > 0:
                k = (key, hardware(a))
                seen[k] = max(seen.get(k, 0.0), seconds)
    return seen


def observed_load_s(key: str, agent: AgentState, observed: ObservedLoads | None = None) -> float | None:
    """Seconds a load of ``key`` takes on ``agent``: its own last one, else one on an agent like it
    (``observed``: `observed_loads` of the fleet); None when neither was seen."""
    own = agent.load_s.get(key, 0.0)
    if own > 0:
        return own
    if observed:
        return observed.get((key, hardware(agent)))
    return None
