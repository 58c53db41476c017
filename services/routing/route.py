"""What one request asks of the fleet (`Route`) and what an agent's state holds for it: a runner
ready to serve it without a reload (`warm`), a load under way that will (`loading_for`), the context
its Ollama would give the model (`wanted_ctx`), the slots of every model's warm runners
(`serving_slots`). Pure functions of `AgentState`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from corral.protocol.messages import AgentState, PsModel
from corral.protocol.names import key_of
from corral.protocol.runners import effective_ctx

__all__ = [
    "Route",
    "loading_for",
    "ready_runner",
    "runner_matches",
    "serving_slots",
    "vram_free",
    "wanted_ctx",
    "warm",
]


@dataclass(frozen=True, slots=True)
class Route:
    """What one request asks of the fleet, as far as routing cares."""

    key: str  # normalised model key (`ModelName.key`)
    vendor: str | None = None  # preferred vendor
    strict: bool = False  # only the preferred vendor will do
    num_ctx: int | None = None  # runner option (None = each agent's default): another context reloads
    session_agent: str | None = None  # the agent that served this conversation last (prompt cache)
    model_size: int = 0  # bytes; 0 when unknown (then the agent's tags are asked)

    def admits(self, vendor: str) -> bool:
        """Whether an agent of ``vendor`` may serve it at all: any, unless it insists on another."""
        return not (self.strict and self.vendor is not None and vendor != self.vendor)


def wanted_ctx(key: str, num_ctx: int | None, agent: AgentState) -> int:
    """The context ``agent``'s Ollama gives a runner for ``key`` asked for ``num_ctx`` (None: the
    agent's default, as observed or assumed); 0 when unknown."""
    trained = agent.trained_ctx.get(key, 0)
    if num_ctx is not None:
        return effective_ctx(num_ctx, trained)
    return agent.default_ctx.get(key) or effective_ctx(agent.default_num_ctx, trained)


def runner_matches(route: Route, agent: AgentState, runner: PsModel) -> bool:
    """Whether ``runner`` can serve ``route`` without a reload: its context is the one asked for,
    or the agent's default when the request asks for none (Ollama reloads on any difference)."""
    want = wanted_ctx(route.key, route.num_ctx, agent)
    return want == 0 or runner.context_length in (0, want)


def loading_for(route: Route, agent: AgentState) -> bool:
    """A load under way at ``agent`` will give ``route`` a matching runner: the model is loading
    there, and (when the agent says for which context) for the context ``route`` needs."""
    if route.key not in agent.loading:
        return False
    ctx = agent.loading_ctx.get(route.key)
    if ctx is None:
        return True  # the agent does not say which context: any load of the model counts
    return wanted_ctx(route.key, ctx or None, agent) == wanted_ctx(route.key, route.num_ctx, agent)


def warm(route: Route, agent: AgentState) -> bool:
    """``agent`` has a runner for ``route`` that needs no reload."""
    runner = ready_runner(agent, route.key)
    return runner is not None and runner_matches(route, agent, runner)


def ready_runner(agent: AgentState, key: str) -> PsModel | None:
    """``agent``'s runner for ``key`` that is ready to serve: Ollama lists a runner in /api/ps from
    the moment its load begins, so one the agent reports still loading does not count yet."""
    if key in agent.loading:
        return None
    for m in agent.loaded:
        if key_of(m.name) == key:
            return m
    return None


def vram_free(agent: AgentState) -> int | None:
    """Free VRAM over all GPUs; None when the agent reports none (then a model is assumed to fit)."""
    if not agent.gpus:
        return None
    return sum(g.vram_free for g in agent.gpus)


def serving_slots(agents: Iterable[AgentState]) -> dict[str, int]:
    """Each model's slots on ``agents``' warm runners at the default context (a runner at another
    context does not serve a request without one)."""
    slots: dict[str, int] = {}
    for a in agents:
        for key in {k for m in a.loaded if (k := key_of(m.name)) is not None and warm(Route(key=k), a)}:
            slots[key] = slots.get(key, 0) + max(a.parallel, 1)
    return slots
