"""The agent's slots: how many requests of each model run at once, and who waits for the next one.

A pure state machine, no I/O and no futures: the agent asks it and maps its answers onto claims
and tasks. Each model (subject token) has ``capacity`` slots. A request either holds a slot or
waits in the model's FIFO; all the FIFOs together hold at most ``max_queue`` requests. A freed
slot passes straight to the oldest waiter of its model, so a model with waiters never shows a free
slot. Jobs are whatever hashable value the caller uses to tell requests apart (the agent's `Job`).

Invariants (checked by a hypothesis state machine): for every model busy + free == capacity, a job
holds at most one slot, a job waits only while its model has no free slot, and grants follow
arrival order.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Hashable
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)


class Admission(enum.Enum):
    RUN = "run"  # it holds a slot now
    QUEUED = "queued"  # it waits for the next slot of its model
    FULL = "full"  # no slot and no room to wait: answer busy


class Ended(NamedTuple, Generic[K]):
    """What ending a job changed."""

    granted: K | None = None  # the waiter that now holds the slot the job held
    freed: bool = False  # the model's free count rose (claims may be armed)
    changed: bool = False  # the job was known: counts changed


class SlotTable(Generic[K]):
    def __init__(self, capacity: int, max_queue: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.max_queue = max_queue
        self._holders: dict[str, set[K]] = {}  # model token → jobs holding one of its slots
        self._queues: dict[str, deque[K]] = {}  # model token → jobs waiting, oldest first
        self._queued = 0

    # -- reading ---------------------------------------------------------------------------
    def busy(self, token: str) -> int:
        return len(self._holders.get(token, ()))

    def free(self, token: str) -> int:
        """Slots of ``token`` nobody holds (0 whenever a job waits for one)."""
        return self.capacity - self.busy(token)

    def waiting(self, token: str) -> int:
        return len(self._queues.get(token, ()))

    def holds(self, token: str, job: K) -> bool:
        return job in self._holders.get(token, ())

    def is_waiting(self, token: str, job: K) -> bool:
        return job in self._queues.get(token, ())

    @property
    def in_flight(self) -> int:
        return sum(len(h) for h in self._holders.values())

    @property
    def queued(self) -> int:
        return self._queued

    def busy_tokens(self) -> set[str]:
        return set(self._holders)

    # -- changing --------------------------------------------------------------------------
    def claim(self, token: str, job: K) -> bool:
        """Take a free slot of ``token`` for ``job`` (a claimed or dequeued request: it never
        waits here). False when none is free: the sender must go elsewhere."""
        if self.free(token) <= 0 or self.holds(token, job) or self.is_waiting(token, job):
            return False
        self._holders.setdefault(token, set()).add(job)
        return True

    def admit(self, token: str, job: K, *, wait: bool = True) -> Admission:
        """A direct request: a free slot, else a place in its model's FIFO (unless not ``wait``),
        else FULL."""
        if self.claim(token, job):
            return Admission.RUN
        if (
            not wait
            or self._queued >= self.max_queue
            or self.holds(token, job)
            or self.is_waiting(token, job)
        ):
            return Admission.FULL
        self._queues.setdefault(token, deque()).append(job)
        self._queued += 1
        return Admission.QUEUED

    def end(self, token: str, job: K) -> Ended[K]:
        """``job`` is done with ``token`` (finished, failed or cancelled, waiting or not); safe to
        call again. A slot it held passes to the oldest waiter, else becomes free."""
        holders = self._holders.get(token)
        if holders is not None and job in holders:
            holders.discard(job)
            q = self._queues.get(token)
            if q:
                nxt = q.popleft()
                self._queued -= 1
                if not q:
                    del self._queues[token]
                holders.add(nxt)
                return Ended(granted=nxt, changed=True)
            if not holders:
                del self._holders[token]
            return Ended(freed=True, changed=True)
        q = self._queues.get(token)
        if q is not None and job in q:
            q.remove(job)
            self._queued -= 1
            if not q:
                del self._queues[token]
            return Ended(changed=True)
        return Ended()

    def waiters(self) -> list[tuple[str, K]]:
        """Every waiting job with its model, oldest first per model."""
        return [(t, j) for t, q in self._queues.items() for j in q]
