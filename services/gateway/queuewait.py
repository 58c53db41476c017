"""How one request waits in the fleet queue: `QueueWait`, a pure state machine (no I/O, no clock).

The gateway's wait (`corral.gateway.queueing.FleetQueue.wait`) waits for the claim of the agent
that takes the request off the queue, at most `QueueWait.timeout` seconds at a time. Each time no
claim came, it tells `QueueWait.silence` what the stream last said of the request and does the I/O
the answer names:

* ``PROMOTE``: a batch request waited ``batch_aging_s`` in its lane; it is withdrawn and queued at
  the end of the interactive lane (unless an agent took it just now, or its deadline is less than
  a recheck away);
* ``EXPIRE``: its deadline came; it is withdrawn and answered 503, unless an agent took it just now, whose
  claim then has one claim timeout to come;
* ``ABANDONED``: an agent took it (the stream no longer holds it) and no claim came within a claim
  timeout since; that agent died between taking and claiming, and the request is routed again;
* ``TAKEN``: an agent took it and its claim is due; the stream is asked again and the wait goes on;
* ``UNREADABLE``: nobody has taken it, and JetStream did not answer for the queue's reader (a
  cluster electing a leader after losing a node): no agent can take it now, however free, so it is
  withdrawn and routed again (by the claims agents with a free slot hold, which need no JetStream);
* ``PASSED``: the stream still holds it, though the queue's reader had already passed it (handed out
  requests past it, or counted none left to hand out) before the stream was last asked: no agent
  will ever get it (see `corral.runtime.workqueue.reader_position` for how nats-server gets there),
  so it is withdrawn and routed again;
* ``RECHECK``: the stream is asked whether it still holds the request, and JetStream whether the
  queue's reader answers (the answers are read at a later silence, so a slow JetStream never holds
  up a claim), and unless some agent has or is loading the model it is withdrawn and routed again.
"""

from __future__ import annotations

import enum
import math

__all__ = ["MIN_WAIT_S", "QueueWait", "Silence"]

# the shortest wait for a claim: never none (a claim may be there already), and a silence this
# close to the deadline is at the deadline (a timer may fire a hair early)
MIN_WAIT_S = 0.001


class Silence(enum.Enum):
    PROMOTE = "promote"
    EXPIRE = "expire"
    ABANDONED = "abandoned"
    TAKEN = "taken"
    UNREADABLE = "unreadable"
    PASSED = "passed"
    RECHECK = "recheck"


class QueueWait:
    """One queued request's wait, from when it was queued (``now``) to its ``deadline``; batch
    requests (``aging_s`` set) are promoted that long after they were queued."""

    def __init__(
        self,
        now: float,
        deadline: float,
        *,
        recheck_s: float,
        claim_timeout_s: float,
        aging_s: float | None = None,
    ) -> None:
        self.deadline = deadline
        self.recheck_s = recheck_s
        self.claim_timeout_s = claim_timeout_s
        self.promote_at = math.inf if aging_s is None else now + aging_s
        self.taken_at: float | None = None  # when the stream first said an agent had taken it

    def timeout(self, now: float) -> float:
        """How long to wait for a claim before the next `silence`: a recheck, or less to wake at
        the promotion or the deadline."""
        return max(min(self.deadline - now, self.recheck_s, self.promote_at - now), MIN_WAIT_S)

    def silence(
        self, now: float, *, left_stream: bool = False, unreadable: bool = False, passed: bool = False
    ) -> Silence:
        """No claim came within `timeout`: what to do now. ``left_stream``: the stream's latest
        answer said it no longer holds the request; ``unreadable``: JetStream's latest answer for
        the queue's reader, asked moments ago, was none; ``passed``: the stream's latest answer said
        it still holds the request, and the reader had passed it before that (handed out requests
        past it, or counted none left to hand out)."""
        if left_stream and self.taken_at is None:
            self.taken_at = now
        remaining = self.deadline - now
        if remaining < MIN_WAIT_S:
            return Silence.EXPIRE
        if unreadable and self.taken_at is None:
            return Silence.UNREADABLE
        if passed and self.taken_at is None:
            return Silence.PASSED
        if now >= self.promote_at:
            self.promote_at = math.inf
            if remaining > self.recheck_s:  # not worth it in its last recheck before the deadline
                return Silence.PROMOTE
        if self.taken_at is None:
            return Silence.RECHECK
        return Silence.ABANDONED if now - self.taken_at >= self.claim_timeout_s else Silence.TAKEN

    def requeued(self) -> None:
        """The request went into the queue anew (promoted): the old entry's fate says nothing."""
        self.taken_at = None
