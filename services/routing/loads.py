"""How long a load of a model takes on an agent: as observed there, on agents like it, or by the
cost model's estimate calibrated by what the fleet observed.

Pure functions of fleet snapshots (`AgentState`). Each agent publishes how long its last load of
each model took (``AgentState.load_s``, measured from Ollama's replies). An agent that has not
loaded the model yet is taken to load it as fast as an agent like it did — same vendor and same
GPUs (`hardware`) — the slowest such agent counting. Where no such load was seen, the estimate
(`estimated_load_s`: a fixed start-up cost plus the file at a nominal disk bandwidth) is scaled by
the agent's *pace* — how its own loads compared with their estimates (its disk) — or, for an agent
that has loaded nothing yet, by the fleet's median pace. So an observation never makes one agent
look cheaper than another only because the other has not been observed yet: a fleet whose disks
are twice as fast as the nominal bandwidth has every estimate halved, observed or not.

How long a request holds a slot — what a queue's wait is made of — is observed the same way: each
agent publishes the median time its last requests of each model took once the model was loaded
(``AgentState.request_s``). An agent that has served none of a model is taken to serve it at the
fleet's median for that model, and where nobody has, at `TYPICAL_REQUEST_S` (`request_time`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from corral.protocol.messages import AgentState
from corral.protocol.names import key_of

__all__ = [
    "DEFAULT_MODEL_SIZE",
    "LOAD_BANDWIDTH",
    "LOAD_OVERHEAD_S",
    "TYPICAL_REQUEST_S",
    "ObservedTimes",
    "estimated_load_s",
    "file_size",
    "hardware",
    "observed_load_s",
    "observed_times",
    "request_time",
]

# Loading: bytes per second from disk into (V)RAM, and the fixed cost of starting a runner.
LOAD_BANDWIDTH: Final = 2_000_000_000
LOAD_OVERHEAD_S: Final = 1.0
# Model size assumed when neither the request nor the agent's tags know it (a 7-8B model at q4).
DEFAULT_MODEL_SIZE: Final = 4_000_000_000
# How long one request holds a slot where no agent has observed the model's yet.
TYPICAL_REQUEST_S: Final = 4.0


@dataclass(frozen=True)
class ObservedTimes:
    """The loads and requests a fleet observed (`observed_times`)."""

    # (model key, `hardware`) → seconds a load of the model took on such an agent (the slowest)
    seconds: Mapping[tuple[str, tuple[str, ...]], float] = field(default_factory=dict)
    pace: Mapping[str, float] = field(default_factory=dict)  # agent id → observed ÷ estimated
    fleet_pace: float = 1.0  # the median pace of the agents with loads observed (1: none)
    # model key → seconds a request of it holds a slot: the median over the agents that observed it
    requests: Mapping[str, float] = field(default_factory=dict)

    def pace_of(self, agent: AgentState) -> float:
        return self.pace.get(agent.id, self.fleet_pace)


def hardware(agent: AgentState) -> tuple[str, ...]:
    """What a load's speed depends on besides the model, as far as an agent says: its vendor and
    the names of its GPUs (the disk is not published)."""
    return (agent.vendor, *sorted(g.name for g in agent.gpus))


def file_size(key: str, agent: AgentState) -> int:
    """The model file's size as ``agent`` lists it (what a load reads); `DEFAULT_MODEL_SIZE` when
    it does not."""
    for m in agent.models:
        if m.size > 0 and key_of(m.name) == key:
            return m.size
    return DEFAULT_MODEL_SIZE


def estimated_load_s(size: int) -> float:
    """A load of a ``size``-byte model by the nominal figures, before any calibration."""
    return LOAD_OVERHEAD_S + size / LOAD_BANDWIDTH


def observed_times(agents: Iterable[AgentState]) -> ObservedTimes:
    """The loads the agents observed, by model and hardware, each agent's pace, and the requests'
    time per model."""
    seconds: dict[tuple[str, tuple[str, ...]], float] = {}
    pace: dict[str, float] = {}
    held: dict[str, list[float]] = {}
    for a in agents:
        for key, s in a.request_s.items():
            if s > 0:
                held.setdefault(key, []).append(s)
        ratios = []
        for key, s in a.load_s.items():
            if s > 0:
                k = (key, hardware(a))
                seconds[k] = max(seconds.get(k, 0.0), s)
                ratios.append(s / estimated_load_s(file_size(key, a)))
        if ratios:
            pace[a.id] = statistics.median(ratios)
    fleet = statistics.median(pace.values()) if pace else 1.0
    return ObservedTimes(seconds, pace, fleet, {k: statistics.median(v) for k, v in held.items()})


def request_time(key: str, agent: AgentState, observed: ObservedTimes | None = None) -> float:
    """Seconds a request for ``key`` holds a slot on ``agent``: as the agent observed it, else as
    the fleet did (``observed``: `observed_times`), else `TYPICAL_REQUEST_S`."""
    own = agent.request_s.get(key, 0.0)
    if own > 0:
        return own
    if observed is not None:
        return observed.requests.get(key, TYPICAL_REQUEST_S)
    return TYPICAL_REQUEST_S


def observed_load_s(key: str, agent: AgentState, observed: ObservedTimes | None = None) -> float | None:
    """Seconds a load of ``key`` takes on ``agent``: its own last one, else one on an agent like it
    (``observed``: `observed_times` of the fleet); None when neither was seen."""
    own = agent.load_s.get(key, 0.0)
    if own > 0:
        return own
    if observed is not None:
        return observed.seconds.get((key, hardware(agent)))
    return None
