"""`Breakers`: an agent that failed a model's request before answering is left out of the model's
requests for a while, longer after each failure that follows soon, until it answers one."""

from __future__ import annotations

from corral.gateway.breaker import Breakers
from corral.protocol.errors import BackendError

ERR = BackendError("ollama unavailable: connection reset")
MODEL = "llama3.2:latest"


def test_a_failure_trips_the_agent_for_that_model_only_for_the_base_span() -> None:
    b = Breakers(base_s=5.0, max_s=300.0)
    assert b.tripped(MODEL, 0.0) == {}
    b.failed("a", MODEL, ERR, 100.0)
    assert b.tripped(MODEL, 100.0) == {"a": ERR}
    assert b.tripped("other:latest", 100.0) == {}
    assert b.tripped(MODEL, 104.9) == {"a": ERR}
    assert b.tripped(MODEL, 105.0) == {}  # closed after 5 s: the fault may have passed


def test_failures_that_follow_soon_double_the_span_up_to_the_limit() -> None:
    b = Breakers(base_s=5.0, max_s=12.0)
    b.failed("a", MODEL, ERR, 0.0)  # open until 5
    b.failed("a", MODEL, ERR, 6.0)  # within a span of its closing: 10 s
    assert b.tripped(MODEL, 15.9) and not b.tripped(MODEL, 16.0)
    b.failed("a", MODEL, ERR, 17.0)  # again soon: 20 s, capped at 12
    assert b.tripped(MODEL, 28.9) and not b.tripped(MODEL, 29.0)
    b.failed("a", MODEL, ERR, 1000.0)  # long after: the base span again
    assert b.tripped(MODEL, 1004.9) and not b.tripped(MODEL, 1005.0)


def test_an_answer_closes_it() -> None:
    b = Breakers()
    b.failed("a", MODEL, ERR, 0.0)
    b.failed("b", MODEL, ERR, 0.0)
    b.answered("a", MODEL)
    assert set(b.tripped(MODEL, 1.0)) == {"b"}
    b.answered("b", MODEL)
    b.answered("c", MODEL)  # never tripped: nothing to do
    assert b.tripped(MODEL, 1.0) == {}
    b.failed("a", MODEL, ERR, 2.0)  # after an answer, a failure starts at the base span again
    assert b.tripped(MODEL, 6.9) and not b.tripped(MODEL, 7.0)


def test_a_trip_that_can_no_longer_double_is_forgotten() -> None:
    b = Breakers(base_s=5.0)
    b.failed("gone", MODEL, ERR, 0.0)  # open until 5, could double until 10
    assert b.tripped(MODEL, 9.0) == {} and len(b) == 1
    assert b.tripped(MODEL, 10.0) == {} and len(b) == 0


def test_failures_while_it_is_open_are_the_same_fault_counted_once() -> None:
    """An Ollama that refused connections for two seconds failed the 54 requests its agent had
    taken in a moment: one trip of the base span, not one doubled 54 times to the limit."""
    b = Breakers(base_s=5.0, max_s=300.0)
    for i in range(54):
        b.failed("a", MODEL, ERR, 100.0 + i * 0.001)
    assert b.tripped(MODEL, 104.9) and not b.tripped(MODEL, 105.0)  # open until 105, from the first
    b.failed("a", MODEL, ERR, 106.0)  # once it closed, failing again soon: twice as long
    assert b.tripped(MODEL, 115.9) and not b.tripped(MODEL, 116.0)
