"""Finding agents whose process is gone before their heartbeats run out.

An agent's state counts as alive for three heartbeats (15 s by default) after its last one, and a
process killed outright (the OOM killer, SIGKILL, a crash) says nothing meanwhile: requests queued
for its models wait for it. NATS knows at once, though: a server drops the subscriptions of a
connection that closed, and answers a request nobody subscribes to with "no responders"
(https://docs.nats.io/nats-concepts/core-nats/reqreply). So every ``probe_s`` the registry sends
each agent an empty request on its cancel subject (`Subjects.agent_ctl`, which every agent holds
from its start to its stop and answers). An agent that nothing answers for `MISSES` probes in a
row, the first and last at least `ABSENT_S` apart (or 1.5 probe periods, if longer), and that has
not been heard from since the first, is declared dead as if its heartbeats had run out
(`Absences`, a pure state machine; the registry does the I/O in `Prober`).

What it is not fooled by:

- a slow or busy agent: a probe delivered but unanswered in time is no miss (somebody subscribes);
- an agent reconnecting, to the same server or another of a cluster: it subscribes again after
  its reconnect backoff (at most `RECONNECT_MAX_S`) and a connect attempt or two, well inside
  `ABSENT_S`, and writes its state at once, which starts the count again;
- an agent whose state still arrives (its heartbeats, default 5 s, come within `ABSENT_S`): a live
  agent that only this registry's server cannot see (a broken route in a cluster) is heard;
- the registry's own connection coming back (a restarted server, the registry moved): a server that
  just came back knows nobody's subscriptions until every client has reconnected, so what the
  registry found before is forgotten and no miss counts until `SETTLE_S` after it is back.

An agent away from NATS for longer than `ABSENT_S` is removed, and joins again once it is back.
A host that vanishes without closing its connections (power lost, a cable pulled) leaves them open
on the server until NATS's own pings fail; such an agent is found by its heartbeats, as before.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import NamedTuple

import nats.errors
from corral.protocol.subjects import Subjects
from corral.runtime.nats import RECONNECT_MAX_S
from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)

__all__ = ["ABSENT_S", "MISSES", "SETTLE_S", "Absences", "Known", "Presence", "Prober", "round_s"]

MISSES = 3  # probes in a row that nothing answered
CONNECT_TIMEOUT_S = 2.0  # nats-py's wait for a server that takes the connection but does not answer
# nothing answers an agent this long (at least) before it is taken for gone: a reconnect's backoff,
# one connect attempt that timed out and a probe period more; longer than the default heartbeat
ABSENT_S = RECONNECT_MAX_S + CONNECT_TIMEOUT_S + 2.0
SETTLE_S = 2 * RECONNECT_MAX_S  # after the registry's own reconnect, no miss counts for this long


def _span(every_s: float) -> float:
    """How long `MISSES` misses in a row must span at a probe period of ``every_s``: `ABSENT_S`, or
    one and a half periods where longer. Three probes a period apart span two periods, give or take
    how long each round's answers took: one and a half leaves them that margin."""
    return max(1.5 * every_s, ABSENT_S)


class Presence(enum.Enum):
    """What one probe of an agent found."""

    ANSWERED = "answered"  # the agent answered
    SLOW = "slow"  # delivered (somebody subscribes: NATS says "no responders" at once otherwise), unanswered
    ABSENT = "absent"  # nobody subscribes: "no responders"
    UNKNOWN = "unknown"  # the request failed otherwise (the registry's own connection, say)


class Known(NamedTuple):
    """An agent as the registry last heard it."""

    heard: float  # when its state arrived (monotonic)
    revision: int  # that state's KV revision: a removal is conditional on it


class Absences:
    """Which agents nothing answered at their last probes: a pure state machine (no I/O, no clock).

    ``every_s`` is the probe period: an agent is absent for good after `MISSES` misses in a row
    spanning at least `ABSENT_S` (or 1.5 periods, if longer), with nothing heard from it since the
    first."""

    def __init__(self, every_s: float, now: float) -> None:
        self.span_s = _span(every_s)
        self._misses: dict[str, tuple[float, int]] = {}  # agent → (its first miss, misses in a row)
        self._steady_since = now  # misses count from `SETTLE_S` after this

    def period(self, every_s: float) -> None:
        """The probe period is now ``every_s`` (a large fleet is probed less often)."""
        self.span_s = _span(every_s)

    def reconnected(self, now: float) -> None:
        """The registry's own connection came back: what it found before says nothing now."""
        self._misses.clear()
        self._steady_since = now

    def answered(self, agent: str) -> None:
        """Somebody subscribes to the agent's subject (it answered, or was too busy to in time)."""
        self._misses.pop(agent, None)

    def missed(self, agent: str, now: float, heard: float) -> bool:
        """Nothing subscribes to ``agent``'s subject; ``heard``: when its state last arrived. Whether
        it is gone: the agent is then forgotten here (it is removed, or it spoke again)."""
        if now - self._steady_since < SETTLE_S:
            return False
        first, count = self._misses.get(agent, (now, 0))
        if heard >= first:  # it spoke since the first miss (a restart, a reconnect): start again
            first, count = now, 0
        count += 1
        if count >= MISSES and now - first >= self.span_s:
            self._misses.pop(agent, None)
            return True
        self._misses[agent] = (first, count)
        return False

    def keep(self, agents: set[str]) -> None:
        """Forget agents no longer in the fleet."""
        for agent in set(self._misses) - agents:
            del self._misses[agent]

    def missing(self) -> dict[str, int]:
        """Agents missed at their last probe, and how many times in a row (for the log and tests)."""
        return {agent: count for agent, (_, count) in self._misses.items()}


def round_s(every_s: float, agents: int, per_s: float) -> float:
    """How long one round of probes takes: ``every_s``, or longer where probing ``agents`` that
    often would send more than ``per_s`` probes a second (0: no bound)."""
    return max(every_s, agents / per_s) if per_s > 0 else every_s


class Prober:
    """Every round, asks each agent of ``known()`` (id → `Known`, read before the probes go out)
    whether it is there, and calls ``dead(agent, revision)`` for each that `Absences` finds gone,
    with the revision of the state it judged (a state written since wins the removal). A round
    takes ``every_s``, or longer for a fleet that would take more than ``per_s`` probes a second
    (`round_s`): then its probes go out a second's worth (``per_s``) at a time, a second apart,
    each waiting ``every_s`` at most for its answer. Probes sent together are answered together,
    which costs the processes less than the same probes one by one (`bench/README.md`)."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        every_s: float,
        known: Callable[[], Mapping[str, Known]],
        dead: Callable[[str, int], Awaitable[None]],
        *,
        per_s: float = 0.0,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self.every_s = every_s
        self.per_s = per_s
        self._known = known
        self._dead = dead
        self.absences = Absences(every_s, time.monotonic())
        self._epoch = self._reconnects()

    def _reconnects(self) -> int:
        return int(self._nc.stats["reconnects"])

    async def run(self) -> None:
        clock = asyncio.get_running_loop().time
        while True:
            began = clock()
            agents = dict(self._known())
            length = round_s(self.every_s, len(agents), self.per_s)
            await self.probe_once(over_s=length, agents=agents)
            await asyncio.sleep(max(began + length - clock(), 0.0))  # the rest of the round's period

    async def probe_once(
        self, *, over_s: float = 0.0, agents: dict[str, Known] | None = None
    ) -> dict[str, Presence]:
        """One round: every known agent asked (a second's worth of probes at a time when the round
        is longer than one period, ``over_s``; else all at once), then judged. Returns what each
        answer said (`_there`); nothing while the registry's own connection is or was just away.
        ``agents`` is ``known()`` as the caller just read it."""
        epoch = self._reconnects()
        if epoch != self._epoch or not self._nc.is_connected:
            self._epoch = epoch
            self.absences.reconnected(time.monotonic())
            return {}
        if agents is None:
            agents = dict(self._known())
        self.absences.period(max(over_s, self.every_s))
        self.absences.keep(set(agents))
        there = await self._ask(list(agents), over_s)
        if self._reconnects() != epoch or not self._nc.is_connected:  # its answers say nothing
            return {}
        now = time.monotonic()
        for (agent, known), presence in zip(agents.items(), there, strict=True):
            if presence in (Presence.ANSWERED, Presence.SLOW):
                self.absences.answered(agent)
            elif presence is Presence.ABSENT and self.absences.missed(agent, now, known.heard):
                log.warning("agent %s: nothing answers on its NATS subjects (its process is gone)", agent)
                await self._dead(agent, known.revision)
        return dict(zip(agents, there, strict=True))

    async def _ask(self, agents: list[str], over_s: float) -> list[Presence]:
        """Probe ``agents``: all at once, or, for a round of ``over_s`` longer than one period, in
        batches of a second's worth (``per_s``) a second apart."""
        spread = over_s > self.every_s and self.per_s > 0
        size = max(1, int(self.per_s)) if spread else max(1, len(agents))
        asked: list[asyncio.Task[Presence]] = []
        try:
            for i in range(0, len(agents), size):
                if i:
                    await asyncio.sleep(1.0)  # a second's worth at a time: the batches' spacing
                asked += [asyncio.create_task(self._there(agent)) for agent in agents[i : i + size]]
            return list(await asyncio.gather(*asked))
        finally:
            for t in asked:
                t.cancel()  # only when the round itself was cancelled: the others are done

    async def _there(self, agent: str) -> Presence:
        try:
            await self._nc.request(self._subjects.agent_ctl(agent), b"", timeout=self.every_s)
        except nats.errors.NoRespondersError:
            return Presence.ABSENT
        except nats.errors.TimeoutError:
            return Presence.SLOW
        except nats.errors.Error as e:
            log.debug("probe of agent %s: %s", agent, e)
            return Presence.UNKNOWN
        return Presence.ANSWERED
