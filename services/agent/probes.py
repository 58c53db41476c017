"""Whether a job's requester is still there: the rule over the probes of one job (no I/O).

A requester (a gateway, `corral.client`, the registry) listens for a request's answer on its reply
subject. When its process dies, nobody tells the agent: without a check, the agent would go on
generating for nobody until Ollama's answer ends, holding the slot (and the GPU) all that while.

So the agent pings every job it holds now and then with a reply-to of its own: a probe. NATS
answers a message whose reply-to is set and which reaches no subscriber with a "no responders"
status (503) on that reply-to, at once (https://docs.nats.io/nats-concepts/core-nats/reqreply).
One such answer is not proof: a requester reconnecting to NATS (a server restart, a move to
another node of a cluster) has no subscription for a moment. A job's requester is gone when
`MISSES` probes in a row met no responders; any probe that reached it starts the count again.

The claim is a probe too, and one that met no responders is enough: nobody heard the claim, so
a requester that is there after all (reconnecting) takes the request for unclaimed and sends it
elsewhere after its claim timeout, as it does for an agent that died before claiming. So a request
whose requester died while it waited (in the fleet queue, most often) is dropped as soon as it is
taken, not after `MISSES` pings.

(A requester that is there but no longer knows the request, a gateway restarted with the same id,
cancels it itself when a ping names a request it does not hold: `corral.transport.calls`.)
"""

from __future__ import annotations

from typing import Final

MISSES: Final = 5  # probes in a row with no responders: gone (about 10 s at the 2 s ping interval)


class Probes:
    """The probes of one job, numbered from 0 in the order they are sent. ``key`` names the job in
    the probes' reply-to (given by whoever sends them)."""

    __slots__ = ("_claim", "_last_miss", "_streak", "key", "sent")

    def __init__(self) -> None:
        self.key = ""
        self.sent = 0
        self._claim = -1  # the number of the probe the claim carried (-1: none did)
        self._last_miss = -2  # the number of the last probe that met no responders
        self._streak = 0  # probes in a row, ending with that one, that met none

    def next(self) -> int:
        """The number of the probe about to be sent."""
        n = self.sent
        self.sent += 1
        return n

    def claim(self) -> int:
        """The number of the probe the claim carries (the first)."""
        self._claim = self.next()
        return self._claim

    def missed(self, n: int) -> bool:
        """Probe ``n`` met no responders; True when the requester is gone: the claim's, or
        `MISSES` in a row. An answer for a probe never sent, or older than the last miss, changes
        nothing."""
        if self._last_miss < n < self.sent:
            self._streak = self._streak + 1 if n == self._last_miss + 1 else 1
            self._last_miss = n
            if n == self._claim:
                self._streak = MISSES
        return self._streak >= MISSES

    @property
    def gone(self) -> bool:
        return self._streak >= MISSES

    def is_claim(self, n: int) -> bool:
        return n == self._claim
