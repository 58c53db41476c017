"""Load markers: when one has done its work, and the context a request is routed and marked at.

Pure functions of a fleet snapshot (`AgentState`): no I/O, no clocks (ages are passed in).

A load marker (``loading.{token}.{num_ctx or 0}.{pin}`` in the ``{root}_models`` bucket, and the
gateway's own map when no registry runs) stands for one load under way. It has done its work once
the load is done (the agent shows the runner warm) or has clearly failed (the agent is gone, or no
longer shows the load once ``grace_s`` has passed since the marker was written: agent state lags
the send), and in any case after ``ttl_s``. Every marker past that point may be deleted, so the
markers never outnumber the loads under way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from corral.protocol.messages import AgentState
from corral.protocol.runners import effective_ctx
from corral.routing.route import Route, loading_for, warm

__all__ = ["LOAD_MARKER_TTL_S", "marker_expired", "route_ctx", "trained_ctx"]

# No load marker outlives this many seconds, whatever its agent shows.
LOAD_MARKER_TTL_S: Final = 300.0


def marker_expired(
    route: Route, agent: AgentState | None, *, alive: bool, age_s: float, grace_s: float, ttl_s: float
) -> bool:
    """Whether a marker for ``route``'s load at ``agent`` (None: not in the fleet), written
    ``age_s`` seconds ago, has done its work and may be deleted."""
    if age_s >= ttl_s or agent is None or not alive:
        return True
    if warm(route, agent):
        return True  # the load is done
    return not loading_for(route, agent) and age_s >= grace_s


def trained_ctx(key: str, agents: Iterable[AgentState]) -> int:
    """The trained context of ``key`` as any agent reports it; 0 when none knows it."""
    return max((a.trained_ctx.get(key, 0) for a in agents), default=0)


def route_ctx(key: str, num_ctx: int | None, agents: Iterable[AgentState]) -> int | None:
    """The ``num_ctx`` a request for ``key`` is routed and marked at: what it asks for, capped at
    the model's trained context where an agent knows it (Ollama runs it at that context anyway,
    so 32768 and 131072 on a model trained for 8192 are one runner and one load)."""
    if num_ctx is None:
        return None
    return effective_ctx(num_ctx, trained_ctx(key, agents)) or None
