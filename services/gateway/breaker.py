"""Agents that lately failed a model's requests before answering: `Breakers`, pure (times are passed
in), one per gateway.

An agent whose Ollama fails its requests while its server still answers (a crashed runner, a proxy
resetting connections, a runner that stops sending) stays in the fleet: its state looks fine, and it
takes warm claims and fleet-queue requests as fast as it fails them. A request it failed is never
sent there again (`corral.gateway.planner`), but the next one would meet it first. So each failure
trips a breaker for that agent and model: while it is open, this gateway's requests for the model
go to other agents only, by name (not by the shared claim subjects or the fleet queue, which that
agent would take). It stays open for `BASE_S`, twice as long after each failure that follows within
its last span once it closed, up to `MAX_S`; failures while it is open (the requests the agent had
taken when the fault began: a backlog it failed in a moment) count as that one. An answer from the
agent closes it. When only tripped agents could
serve a request, it is sent to them as ever: the fault may have passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from corral.protocol.errors import CorralError

__all__ = ["BASE_S", "MAX_S", "Breakers"]

BASE_S: Final = 5.0
MAX_S: Final = 300.0


@dataclass(frozen=True, slots=True)
class _Trip:
    until: float  # open until then
    span: float  # how long it was opened for
    error: CorralError  # what the agent failed with


class Breakers:
    def __init__(self, base_s: float = BASE_S, max_s: float = MAX_S) -> None:
        self._base, self._max = base_s, max_s
        self._trips: dict[str, dict[str, _Trip]] = {}  # model key → agent id → its last trip

    def failed(self, agent: str, key: str, error: CorralError, now: float) -> None:
        """``agent`` failed a request for model ``key`` before answering it."""
        per = self._trips.setdefault(key, {})
        last = per.get(agent)
        if last is not None and now < last.until:
            return  # while it is open: the same fault (requests it had taken already), counted once
        again = last is not None and now < last.until + last.span  # soon after the last one closed
        span = min(last.span * 2, self._max) if last is not None and again else self._base
        per[agent] = _Trip(now + span, span, error)

    def answered(self, agent: str, key: str) -> None:
        """``agent`` answered a request for ``key``: its breaker for the model closes."""
        per = self._trips.get(key)
        if per is not None and per.pop(agent, None) is not None and not per:
            del self._trips[key]

    def tripped(self, key: str, now: float) -> dict[str, CorralError]:
        """The agents to leave out of ``key``'s requests now, with what each failed with. A trip
        that could no longer double (a span after it closed) is forgotten: an agent that left the
        fleet leaves nothing behind."""
        per = self._trips.get(key)
        if not per:
            return {}
        for agent in [a for a, trip in per.items() if now >= trip.until + trip.span]:
            del per[agent]
        if not per:
            del self._trips[key]
        return {agent: trip.error for agent, trip in per.items() if trip.until > now}

    def __len__(self) -> int:
        """Trips remembered, open or able to double."""
        return sum(len(per) for per in self._trips.values())
