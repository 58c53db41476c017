"""The agent's slot table: unit cases and a hypothesis state machine over random job lives."""

from __future__ import annotations

from collections import deque

import pytest
from corral.agent.slots import Admission, SlotTable
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

TOKENS = ("a", "b")


def test_a_freed_slot_passes_to_the_oldest_waiter() -> None:
    t: SlotTable[str] = SlotTable(capacity=1, max_queue=4)
    assert t.admit("a", "j1") is Admission.RUN
    assert t.admit("a", "j2") is Admission.QUEUED
    assert t.admit("a", "j3") is Admission.QUEUED
    assert t.free("a") == 0 and t.waiting("a") == 2
    ended = t.end("a", "j1")
    assert ended.granted == "j2" and not ended.freed
    assert t.holds("a", "j2") and t.busy("a") == 1


def test_a_waiter_granted_a_slot_gives_it_back_when_it_ends_before_running() -> None:
    """The slot handed to a waiter is the waiter's at once: ending it (a cancellation before it
    resumed) frees that slot instead of losing it."""
    t: SlotTable[str] = SlotTable(capacity=1, max_queue=4)
    t.admit("a", "j1")
    t.admit("a", "j2")
    assert t.end("a", "j1").granted == "j2"
    ended = t.end("a", "j2")
    assert ended.freed and t.free("a") == 1 and t.in_flight == 0


def test_ending_twice_changes_nothing_the_second_time() -> None:
    t: SlotTable[str] = SlotTable(capacity=2, max_queue=0)
    t.claim("a", "j1")
    assert t.end("a", "j1").freed
    assert t.end("a", "j1") == (None, False, False)


def test_the_queue_bound_covers_every_model_and_claims_never_wait() -> None:
    t: SlotTable[str] = SlotTable(capacity=1, max_queue=1)
    assert t.claim("a", "j1") and t.claim("b", "k1")
    assert not t.claim("a", "j2")  # a claim with no free slot is refused, not queued
    assert t.admit("a", "j2") is Admission.QUEUED
    assert t.admit("b", "k2") is Admission.FULL
    assert t.queued == 1


def test_a_direct_request_that_may_not_wait_is_refused_when_no_slot_is_free() -> None:
    t: SlotTable[str] = SlotTable(capacity=1, max_queue=4)
    assert t.admit("a", "j1", wait=False) is Admission.RUN
    assert t.admit("a", "j2", wait=False) is Admission.FULL
    assert t.queued == 0 and not t.is_waiting("a", "j2")
    assert t.admit("a", "j2") is Admission.QUEUED  # one that may wait, waits


def test_capacity_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        SlotTable(capacity=0, max_queue=1)


class SlotMachine(RuleBasedStateMachine):
    """Random admissions, claims, cancellations and releases against a plain model of the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 2
        self.table: SlotTable[int] = SlotTable(capacity=self.capacity, max_queue=3)
        self.next_id = 0
        self.running: dict[int, str] = {}  # job → token, holding a slot
        self.waiting: dict[str, deque[int]] = {t: deque() for t in TOKENS}

    def _new(self) -> int:
        self.next_id += 1
        return self.next_id

    @rule(token=st.sampled_from(TOKENS))
    def admit(self, token: str) -> None:
        job = self._new()
        before = self.table.queued
        got = self.table.admit(token, job)
        holding = sum(1 for t in self.running.values() if t == token)
        if holding < self.capacity:
            assert got is Admission.RUN
            self.running[job] = token
        elif before < 3:
            assert got is Admission.QUEUED
            self.waiting[token].append(job)
        else:
            assert got is Admission.FULL

    @rule(token=st.sampled_from(TOKENS))
    def claim(self, token: str) -> None:
        job = self._new()
        holding = sum(1 for t in self.running.values() if t == token)
        assert self.table.claim(token, job) is (holding < self.capacity)
        if holding < self.capacity:
            self.running[job] = token

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """A running job ends (finished, failed, or cancelled while holding its slot)."""
        job = data.draw(st.sampled_from(sorted(self.running)))
        token = self.running.pop(job)
        ended = self.table.end(token, job)
        assert ended.changed
        if self.waiting[token]:
            nxt = self.waiting[token].popleft()
            assert ended.granted == nxt and not ended.freed
            self.running[nxt] = token
        else:
            assert ended.granted is None and ended.freed
        assert not self.table.end(token, job).changed  # a second end is a no-op

    @precondition(lambda self: any(self.waiting.values()))
    @rule(data=st.data())
    def cancel_waiter(self, data: st.DataObject) -> None:
        token = data.draw(st.sampled_from([t for t in TOKENS if self.waiting[t]]))
        job = data.draw(st.sampled_from(list(self.waiting[token])))
        self.waiting[token].remove(job)
        ended = self.table.end(token, job)
        assert ended.changed and ended.granted is None and not ended.freed

    @rule()
    def refresh(self) -> None:
        """What the agent reads on a refresh agrees with the model."""
        assert self.table.in_flight == len(self.running)
        assert self.table.queued == sum(len(q) for q in self.waiting.values())
        assert self.table.busy_tokens() == set(self.running.values())

    @invariant()
    def counts_add_up(self) -> None:
        for token in TOKENS:
            busy = self.table.busy(token)
            assert busy + self.table.free(token) == self.capacity
            assert busy == sum(1 for t in self.running.values() if t == token)
            assert self.table.waiting(token) == len(self.waiting[token])
            if self.table.waiting(token):
                assert self.table.free(token) == 0  # nobody waits beside a free slot

    @invariant()
    def no_slot_counted_twice(self) -> None:
        for job, token in self.running.items():
            assert self.table.holds(token, job)
            assert not any(self.table.is_waiting(t, job) for t in TOKENS)
            assert sum(self.table.holds(t, job) for t in TOKENS) == 1

    @invariant()
    def waiters_keep_arrival_order(self) -> None:
        """Per model, the table's waiters are the model's FIFO, in arrival order (a release grants
        the head: checked in `release`)."""
        for token in TOKENS:
            assert list(self.waiting[token]) == [j for _, j in self.table.waiters() if _ == token]

    def teardown(self) -> None:
        """When every job ends, nothing is busy and nothing waits: no slot was lost."""
        for token in TOKENS:
            for job in list(self.waiting[token]):
                self.table.end(token, job)
        for job, token in list(self.running.items()):
            self.table.end(token, job)
            self.running.pop(job)
        # ending a holder may grant to a waiter already ended: nothing may remain either way
        for token, job in self.table.waiters():
            self.table.end(token, job)
        assert self.table.in_flight == 0 and self.table.queued == 0
        for token in TOKENS:
            assert self.table.free(token) == self.capacity


SlotMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_slot_machine = SlotMachine.TestCase
