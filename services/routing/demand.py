"""A model's demand on the fleet, measured: its requests running and waiting, as moving averages.

A model's **demand** is the mean number of its requests in the fleet: running (the slot-seconds its
requests held per second, by the agents' own counts: `SlotTimeReadings`) plus waiting (the fleet
queue's depth), measured by `DemandMeter` as moving averages over a time constant. What its slots
can run is their number times the share of them it keeps busy (`busy_shares`: measured on a model
whose requests wait, for a slot also spends time between requests); demand above that waits
(`waiting`). `spares` says whether a model can
give up some of its slots and still run its demand. Pure: times are passed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from corral.protocol.messages import AgentState

__all__ = ["SATURATED", "Demand", "DemandMeter", "SlotTimeReadings", "busy_shares", "spares", "waiting"]

SATURATED: Final = 1.0  # a model with this many requests waiting on average runs all its slots can
SHARE_FLOOR: Final = 0.25  # the least share of its slots a model is taken to keep running
_NEGLIGIBLE = 1e-3  # a model whose averages fell below this is forgotten


@dataclass(frozen=True, slots=True)
class Demand:
    """One model's requests in the fleet, on average: running (slots in use) and waiting."""

    running: float = 0.0
    waiting: float = 0.0

    @property
    def total(self) -> float:
        return self.running + self.waiting


class SlotTimeReadings:
    """What each model's requests held in slots between two readings of the fleet, from each agent's
    running total (``AgentState.slot_s``: slot-seconds since it started, running requests counted so
    far). An agent's first reading is its baseline (its past is not this interval's); one that
    started again since (``started_at`` moved) counts from zero; one not in a reading starts again
    from a baseline when it returns."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, Mapping[str, float]]] = {}  # agent id → (started_at, slot_s)

    def read(self, agents: Iterable[AgentState]) -> dict[str, float]:
        """Model key → slot-seconds its requests held since the last reading, over ``agents``."""
        held: dict[str, float] = {}
        last, self._last = self._last, {}
        for a in agents:
            self._last[a.id] = (a.started_at, a.slot_s)
            before = last.get(a.id)
            if before is None:
                continue
            since = {} if before[0] != a.started_at else before[1]
            for key, total in a.slot_s.items():
                grew = total - since.get(key, 0.0)
                if grew > 0:
                    held[key] = held.get(key, 0.0) + grew
        return held


class DemandMeter:
    """Moving averages (time constant ``tau_s``) of each model's `Demand`. Slot-seconds held are
    added as they are read (`ran`); each `sample` closes an interval: its slot-seconds over its
    length, and the queue depth read at its end, move the averages by the interval's weight."""

    def __init__(self, tau_s: float, now: float) -> None:
        if tau_s <= 0:
            raise ValueError("tau_s must be positive")
        self.tau_s = tau_s
        self.since = now  # when measuring began
        self._at = now  # the last sample
        self._ran: dict[str, float] = {}  # model key → slot-seconds finished since the last sample
        self._running: dict[str, float] = {}
        self._waiting: dict[str, float] = {}

    def ran(self, key: str, seconds: float) -> None:
        """Requests of model ``key`` held slots for ``seconds`` in all, in this interval."""
        if seconds > 0 and math.isfinite(seconds):
            self._ran[key] = self._ran.get(key, 0.0) + seconds

    def sample(self, now: float, waiting: Mapping[str, int]) -> None:
        """Close the interval ending ``now``; ``waiting``: each model's requests queued now."""
        dt = now - self._at
        if dt <= 0:
            return
        weight = 1.0 - math.exp(-dt / self.tau_s)
        for key in {*self._running, *self._waiting, *self._ran, *waiting}:
            run = self._running.get(key, 0.0)
            run += weight * (self._ran.get(key, 0.0) / dt - run)
            wait = self._waiting.get(key, 0.0)
            wait += weight * (waiting.get(key, 0) - wait)
            if run < _NEGLIGIBLE and wait < _NEGLIGIBLE and not waiting.get(key):
                self._running.pop(key, None)
                self._waiting.pop(key, None)
            else:
                self._running[key], self._waiting[key] = run, wait
        self._ran.clear()
        self._at = now

    def demand(self) -> dict[str, Demand]:
        """Each model's averages as of the last sample."""
        return {k: Demand(self._running.get(k, 0.0), self._waiting.get(k, 0.0)) for k in self._running}


def busy_shares(demand: Mapping[str, Demand], slots: Mapping[str, int]) -> tuple[dict[str, float], float]:
    """The share of its slots each model keeps running, where it can be told: a model with requests
    waiting (`SATURATED` on average) runs as many as it can, so its running average over its slots
    is what a slot of it gives (below 1 by the time a slot spends between requests: taking the
    next, sending the reply). Clipped to [`SHARE_FLOOR`, 1]. Also the share for the other models:
    the lowest measured (1 when none is), so a model that gives up a card is not taken to do more
    with fewer slots than the busiest does."""
    shares = {
        k: min(1.0, max(SHARE_FLOOR, d.running / slots[k]))
        for k, d in demand.items()
        if d.waiting >= SATURATED and slots.get(k, 0) > 0
    }
    return shares, min(shares.values(), default=1.0)


def waiting(
    demand: Mapping[str, Demand],
    slots: Mapping[str, int],
    shares: Mapping[str, float] | None = None,
    share: float = 1.0,
) -> float:
    """The requests waiting on average when each model has ``slots``: the sum, over the models with
    more demand than their slots run (slots × its share of `busy_shares`, else ``share``), of the
    difference."""
    shares = shares or {}
    return sum(max(0.0, d.total - slots.get(k, 0) * shares.get(k, share)) for k, d in demand.items())


def spares(demand: Mapping[str, Demand], serving: Mapping[str, int], key: str, lost: int) -> bool:
    """Whether model ``key`` still runs its demand on its ``serving`` slots less ``lost``: a model
    nobody measured spares anything; one whose requests wait spares nothing."""
    d = demand.get(key)
    if d is None:
        return True
    shares, share = busy_shares(demand, serving)
    return d.total <= (serving.get(key, 0) - lost) * shares.get(key, share)
