"""`Outage`: how long the gateway has been cut off from NATS, and when a waiting request gives up."""

from __future__ import annotations

from corral.gateway.outage import Outage


def test_a_connection_seen_up_is_no_outage() -> None:
    o = Outage(10.0)
    assert o.seen(True, 100.0, 0) is None and o.since is None


def test_an_outage_counts_from_the_first_look_that_saw_it_and_ends_requests_at_the_limit() -> None:
    o = Outage(10.0)
    assert o.seen(False, 100.0, 0) is None
    assert o.seen(False, 109.9, 0) is None
    assert (
        o.seen(False, 110.0, 0) == "fleet unreachable: this gateway has been disconnected from NATS for 10 s"
    )


def test_a_reconnect_starts_the_count_again() -> None:
    o = Outage(10.0)
    o.seen(False, 100.0, 0)
    assert o.seen(True, 105.0, 0) is None
    assert o.seen(False, 106.0, 0) is None
    assert o.seen(False, 115.0, 0) is None  # 9 s of this outage
    assert o.seen(False, 116.0, 0) is not None


def test_a_limit_of_zero_never_ends_a_request() -> None:
    o = Outage(0.0)
    o.seen(False, 0.0, 0)
    assert o.seen(False, 1e6, 0) is None


def test_an_outage_nobody_looked_at_the_end_of_is_not_taken_for_the_next_one() -> None:
    """Nothing waited while the connection was back (no look saw it up): the next outage, after a
    reconnect, counts from its own first look."""
    o = Outage(10.0)
    assert o.seen(False, 100.0, 0) is None
    assert o.seen(False, 200.0, 1) is None  # reconnected once since, and down again
    assert o.seen(False, 209.0, 1) is None
    assert o.seen(False, 210.0, 1) is not None
