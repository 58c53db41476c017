"""`StatePacer`: what the agent publishes between heartbeats (pure; times are given)."""

from __future__ import annotations

import msgspec
from corral.agent.pacing import Pace, StatePacer, parts
from corral.protocol.messages import AgentState, PsModel

HB = 5.0
IDLE = AgentState(id="a1", vendor="nvidia", host="h", ollama_url="http://h", updated_at=1.0)


def at(state: AgentState, **changes: object) -> tuple[bytes, tuple[int, int, tuple[str, ...]]]:
    return parts(msgspec.structs.replace(state, **changes))


def published(pacer: StatePacer, now: float, state: AgentState = IDLE) -> StatePacer:
    pacer.published(now, *parts(state))
    return pacer


def test_the_first_reading_goes_out_at_once_and_the_heartbeat_is_due_then() -> None:
    pacer = StatePacer(HB)
    assert pacer.until_heartbeat(0.0) == 0.0
    assert pacer.decide(0.0, *parts(IDLE)) is Pace.PUBLISH
    published(pacer, 0.0)
    assert pacer.until_heartbeat(1.0) == HB - 1.0
    assert pacer.until_heartbeat(HB + 3) == 0.0


def test_nothing_changed_nothing_goes_out_until_the_heartbeat() -> None:
    pacer = published(StatePacer(HB), 0.0)
    assert pacer.decide(1.0, *at(IDLE, updated_at=2.0)) is Pace.SKIP  # only its timestamp moved
    assert pacer.decide(HB, *parts(IDLE)) is Pace.PUBLISH


def test_request_times_ride_along_with_the_next_publish() -> None:
    pacer = published(StatePacer(HB), 0.0)
    timed = at(IDLE, request_s={"m:latest": 0.25})
    assert pacer.decide(1.0, *timed) is Pace.SKIP  # a moved median alone is no news
    assert pacer.decide(HB, *timed) is Pace.PUBLISH  # the heartbeat carries it


def test_a_change_of_what_the_agent_holds_goes_out_at_once() -> None:
    pacer = published(StatePacer(HB), 0.0)
    runner = PsModel(name="m:latest", model="m:latest", size=1, digest="d", expires_at="", size_vram=1)
    assert pacer.decide(0.01, *at(IDLE, loaded=(runner,))) is Pace.PUBLISH
    assert pacer.decide(0.01, *at(IDLE, loading=("llama3.2:latest",))) is Pace.PUBLISH
    assert pacer.decide(0.01, *at(IDLE, status="draining")) is Pace.PUBLISH
    # a change of what it holds goes out at once even while the counts changed too
    assert pacer.decide(0.01, *at(IDLE, in_flight=1, status="cordoned")) is Pace.PUBLISH


def test_request_counts_that_undo_themselves_within_the_settle_time_are_not_published() -> None:
    pacer = published(StatePacer(HB, settle_s=0.1), 0.0)
    assert pacer.decide(1.0, *at(IDLE, in_flight=1, busy_models=("m",))) is Pace.SETTLE
    assert pacer.decide(1.1, *parts(IDLE)) is Pace.SKIP  # the request ended meanwhile
    # and a later change settles again from the start
    assert pacer.decide(2.0, *at(IDLE, queued=2)) is Pace.SETTLE


def test_request_counts_that_stand_for_the_settle_time_are_published() -> None:
    pacer = published(StatePacer(HB, settle_s=0.1), 0.0)
    busy = msgspec.structs.replace(IDLE, in_flight=1, busy_models=("m",))
    assert pacer.decide(1.0, *parts(busy)) is Pace.SETTLE
    assert pacer.decide(1.1, *parts(busy)) is Pace.PUBLISH
    published(pacer, 1.1, busy)
    assert pacer.decide(1.2, *parts(busy)) is Pace.SKIP
    # its end settles too, and another count than the one that settled still goes out
    assert pacer.decide(2.0, *parts(IDLE)) is Pace.SETTLE
    assert pacer.decide(2.1, *at(IDLE, in_flight=2)) is Pace.PUBLISH


def test_a_publish_that_failed_is_not_counted_as_said() -> None:
    pacer = published(StatePacer(HB), 0.0)
    loading = at(IDLE, loading=("m",))
    assert pacer.decide(0.5, *loading) is Pace.PUBLISH  # the put failed: `published` not called
    assert pacer.decide(0.7, *loading) is Pace.PUBLISH


def test_a_failed_publish_is_tried_again_backing_off_to_a_heartbeat_whatever_changes() -> None:
    """JetStream without a quorum fails every publish: retries go out 0.2 s, 0.4 s, ... apart, up
    to a heartbeat, not every time the state changes; the first that goes out starts over."""
    pacer = published(StatePacer(HB), 0.0)
    changed = at(IDLE, status="draining")
    assert pacer.decide(1.0, *changed) is Pace.PUBLISH
    waits = [pacer.failed(1.0)]
    assert pacer.decide(1.1, *changed) is Pace.SKIP  # not before its retry, changed or not
    assert abs(pacer.until_heartbeat(1.1) - 0.1) < 1e-9  # woken for the retry, not the heartbeat
    now = 1.0
    for _ in range(6):
        now += waits[-1]
        assert pacer.decide(now, *changed) is Pace.PUBLISH
        waits.append(pacer.failed(now))
    assert waits == [0.2, 0.4, 0.8, 1.6, 3.2, HB, HB]
    now += HB
    published(pacer, now, msgspec.structs.replace(IDLE, status="draining"))
    assert pacer.decide(now + 0.1, *at(IDLE, status="active")) is Pace.PUBLISH  # at once again
    assert pacer.failed(now + 0.1) == 0.2


def test_slot_time_rides_along_with_the_next_publish() -> None:
    pacer = published(StatePacer(HB), 0.0)
    grown = at(IDLE, slot_s={"m:latest": 12.5})  # grows while any request runs
    assert pacer.decide(1.0, *grown) is Pace.SKIP
    assert pacer.decide(HB, *grown) is Pace.PUBLISH
