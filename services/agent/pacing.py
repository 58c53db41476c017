"""When the agent publishes its state: `StatePacer`, a pure state machine (no I/O, no clock).

The agent's state (`AgentState`) goes to the agents bucket on every heartbeat, and between
heartbeats when it changed:

* a change of what the agent *holds* — models, runners, loads under way, status — goes out at once:
  routers place loads and spare busy models by it;
* a change of its request counts alone (``in_flight``, ``queued``, ``busy_models``) waits
  `SETTLE_S` first and goes out only if it still stands. A request that starts and ends within it
  changes nothing anyone would read, and a fleet of a thousand agents each publishing twice per
  short request costs every reader of the bucket a decode per publish for nothing. Each sender
  counts the calls it placed itself (`corral.transport.calls.Transport.outstanding`), so the wait
  only delays what *other* senders learn of this agent's load, by at most `SETTLE_S`;
* a change of ``request_s`` alone (how long its requests hold a slot: a median that moves with
  nearly every request answered) or of ``slot_s`` (the slot time its requests have held, which
  grows while any runs) does not call for a publish: it goes out with the next one, at the latest
  with the heartbeat;
* nothing changed: nothing is published until the heartbeat is due;
* a publish that failed (JetStream without a quorum, a leader being elected) is tried again after
  `RETRY_FIRST_S`, doubling to a heartbeat while it keeps failing, whatever changes meanwhile.

The agent hands each reading over as two parts (`parts`): the state without its counts, request
times and timestamp, and the counts.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec
from corral.protocol.messages import AgentState, agent_state_encoder

__all__ = ["SETTLE_S", "Pace", "Reading", "StatePacer", "parts"]

# How long a change of the request counts alone must stand before it is published.
SETTLE_S: Final = 0.1
# The wait before a publish that failed is tried again (it doubles while they keep failing).
RETRY_FIRST_S: Final = 0.2

Counts = tuple[int, int, tuple[str, ...]]  # in_flight, queued, busy_models
Reading = tuple[bytes, Counts]  # `parts` of a state: its shape, encoded, and its counts


class Pace(enum.Enum):
    PUBLISH = "publish"  # now
    SETTLE = "settle"  # read again after SETTLE_S, then decide again
    SKIP = "skip"  # nothing to say before the next heartbeat


def parts(state: AgentState) -> Reading:
    """(``state`` without its request counts, request and slot times and timestamp, encoded; the
    counts)."""
    shape = msgspec.structs.replace(
        state, in_flight=0, queued=0, busy_models=(), request_s={}, slot_s={}, updated_at=0.0
    )
    return agent_state_encoder.encode(shape), (state.in_flight, state.queued, state.busy_models)


class StatePacer:
    """Decides, for each reading of the agent's state, whether to publish it (module docstring)."""

    def __init__(self, heartbeat_s: float, settle_s: float = SETTLE_S) -> None:
        self.heartbeat_s = heartbeat_s
        self.settle_s = settle_s
        self._shape: bytes | None = None  # as last published (None: never)
        self._counts: Counts | None = None
        self._at = 0.0  # when it was published
        self._settling = False  # the counts changed and are waiting out `settle_s`
        self._retry_at = 0.0  # after a failed publish: none before this
        self._retry_s = 0.0  # the wait after the last failure (0: the last publish went out)

    def until_heartbeat(self, now: float) -> float:
        """Seconds until the next heartbeat is due (0: due now, or nothing published yet), or
        after a failed publish until its retry."""
        if self._retry_s:  # the last publish failed: the next try is due then
            return max(self._retry_at - now, 0.0)
        if self._shape is None:
            return 0.0
        return max(self._at + self.heartbeat_s - now, 0.0)

    def decide(self, now: float, shape: bytes, counts: Counts) -> Pace:
        """What to do with a reading taken at ``now`` (`parts` of the state)."""
        if now < self._retry_at:
            return Pace.SKIP  # a publish failed moments ago: not before its retry
        if self._shape is None or shape != self._shape or now >= self._at + self.heartbeat_s:
            return Pace.PUBLISH
        if counts == self._counts:
            self._settling = False
            return Pace.SKIP
        if self._settling:
            return Pace.PUBLISH  # it stood for `settle_s`
        self._settling = True
        return Pace.SETTLE

    def published(self, now: float, shape: bytes, counts: Counts) -> None:
        """The reading ``shape``/``counts`` went out at ``now``."""
        self._shape, self._counts, self._at, self._settling = shape, counts, now, False
        self._retry_at, self._retry_s = 0.0, 0.0

    def failed(self, now: float) -> float:
        """A publish at ``now`` failed: returns the wait before the next try (`RETRY_FIRST_S`,
        doubled for each failure in a row, at most a heartbeat)."""
        self._retry_s = min(max(self._retry_s * 2, RETRY_FIRST_S), self.heartbeat_s)
        self._retry_at = now + self._retry_s
        self._settling = False
        return self._retry_s
