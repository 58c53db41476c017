"""`QueueWait`: what a request waiting in the fleet queue does each time no claim came."""

from __future__ import annotations

from corral.gateway.queuewait import MIN_WAIT_S, QueueWait, Silence
from hypothesis import given
from hypothesis import strategies as st

RECHECK_S, CLAIM_S = 2.0, 2.0


def _wait(deadline: float = 60.0, aging_s: float | None = None) -> QueueWait:
    return QueueWait(0.0, deadline, recheck_s=RECHECK_S, claim_timeout_s=CLAIM_S, aging_s=aging_s)


def test_it_waits_a_recheck_at_a_time_and_then_what_is_left() -> None:
    w = _wait(deadline=5.0)
    assert w.timeout(0.0) == RECHECK_S
    assert w.timeout(4.0) == 1.0
    assert w.timeout(5.0) == 0.001  # never a wait of nothing: the claim may be there already
    assert w.timeout(9.0) == 0.001


def test_with_nothing_known_each_silence_asks_the_stream_until_the_deadline() -> None:
    w = _wait(deadline=10.0)
    assert [w.silence(t) for t in (2.0, 4.0, 6.0, 8.0, 9.99)] == [Silence.RECHECK] * 5
    assert w.silence(10.0) is Silence.EXPIRE  # withdraw it and answer 503
    assert w.silence(11.0) is Silence.EXPIRE
    assert _wait(deadline=10.0).silence(10.0 - MIN_WAIT_S / 2) is Silence.EXPIRE  # a timer a hair early


def test_a_taken_request_waits_one_claim_timeout_for_its_claim_then_is_routed_again() -> None:
    w = _wait()
    assert w.silence(2.0) is Silence.RECHECK
    assert w.silence(4.0, left_stream=True) is Silence.TAKEN  # an agent took it: its claim is due
    assert w.silence(5.0) is Silence.TAKEN  # no answer yet from the next ask: still taken
    assert w.silence(5.9, left_stream=True) is Silence.TAKEN  # a later answer does not restart it
    assert w.silence(6.0) is Silence.ABANDONED  # a claim timeout since it was first seen taken


def test_the_deadline_goes_before_an_abandoned_take() -> None:
    w = _wait(deadline=10.0)
    assert w.silence(8.5, left_stream=True) is Silence.TAKEN
    assert w.silence(10.0) is Silence.EXPIRE  # a claim on its way still has its claim timeout


def test_a_batch_request_is_promoted_once_at_its_age_and_then_rechecks_as_any() -> None:
    w = _wait(aging_s=5.0)
    assert w.timeout(0.0) == RECHECK_S
    assert w.timeout(4.0) == 1.0  # woken for its promotion, not a recheck later
    assert w.silence(4.0) is Silence.RECHECK
    assert w.silence(5.0) is Silence.PROMOTE
    assert w.timeout(5.0) == RECHECK_S
    assert w.silence(7.0) is Silence.RECHECK


def test_a_batch_request_aged_within_a_recheck_of_its_deadline_stays_where_it_is() -> None:
    w = _wait(deadline=6.0, aging_s=5.0)
    assert w.silence(5.0) is Silence.RECHECK  # not moved for its last second
    assert w.timeout(5.0) == 1.0
    assert w.silence(6.0) is Silence.EXPIRE


def test_a_promoted_request_forgets_what_the_stream_said_of_its_old_entry() -> None:
    w = _wait(aging_s=5.0)
    assert w.silence(5.0, left_stream=True) is Silence.PROMOTE  # the withdraw decides: taken or not
    w.requeued()  # it was not taken after all: withdrawn and queued again
    assert w.silence(8.0) is Silence.RECHECK
    assert w.silence(20.0) is Silence.RECHECK


def test_a_request_nobody_took_while_the_queue_cannot_be_read_is_routed_again() -> None:
    w = _wait(deadline=10.0)
    assert w.silence(2.0) is Silence.RECHECK
    assert w.silence(4.0, unreadable=True) is Silence.UNREADABLE  # withdrawn, routed by claims


def test_a_request_the_reader_passed_over_is_routed_again() -> None:
    """Still in the stream, though the queue's reader had handed out requests past it: no agent
    will get it (a NATS killed outright lost its removal), so it is withdrawn and routed again."""
    w = _wait()
    assert w.silence(1.0) is Silence.RECHECK
    assert w.silence(2.0, passed=True) is Silence.PASSED
    assert _wait(deadline=10.0).silence(10.0, passed=True) is Silence.EXPIRE  # the deadline first


def test_an_unreadable_queue_does_not_take_back_a_request_an_agent_took() -> None:
    w = _wait(deadline=10.0)
    assert w.silence(2.0, left_stream=True) is Silence.TAKEN  # its claim is due: wait for it
    assert w.silence(3.0, unreadable=True) is Silence.TAKEN
    assert w.silence(4.0, unreadable=True) is Silence.ABANDONED
    assert _wait(deadline=10.0).silence(10.0, unreadable=True) is Silence.EXPIRE  # the deadline first


@given(
    deadline=st.floats(0.0, 120.0),
    aging=st.one_of(st.none(), st.floats(0.0, 120.0)),
    steps=st.lists(st.tuples(st.floats(0.0, 5.0), st.booleans(), st.booleans()), max_size=40),
)
def test_every_wait_is_bounded_and_ends_at_the_deadline(
    deadline: float, aging: float | None, steps: list[tuple[float, bool, bool]]
) -> None:
    """Each wait is positive and at most a recheck; a silence at the deadline expires, and none
    well before it does; a request is promoted at most once, never in its last recheck."""
    w = _wait(deadline=deadline, aging_s=aging)
    now, promoted = 0.0, 0
    for dt, left, unreadable in steps:
        assert MIN_WAIT_S <= w.timeout(now) <= RECHECK_S
        now += dt
        step = w.silence(now, left_stream=left, unreadable=unreadable)
        if now >= deadline:
            assert step is Silence.EXPIRE
        elif deadline - now >= 2 * MIN_WAIT_S:
            assert step is not Silence.EXPIRE
        if step is Silence.PROMOTE:
            promoted += 1
            assert aging is not None and now >= aging and deadline - now > RECHECK_S
    assert promoted <= 1
