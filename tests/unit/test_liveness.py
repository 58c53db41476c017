"""`Absences`: when the registry takes an agent nothing answers for gone (no I/O, a given clock)."""

from __future__ import annotations

from corral.registry.liveness import MISSES, SETTLE_S, Absences

EVERY_S = 1.0
T0 = 100.0
STEADY = T0 + SETTLE_S  # the first moment a miss counts
HEARD = T0 - 50.0  # the agent's state last arrived long ago


def absences() -> Absences:
    return Absences(EVERY_S, T0)


def misses(a: Absences, agent: str, start: float, n: int, heard: float = HEARD) -> list[bool]:
    return [a.missed(agent, start + i * EVERY_S, heard) for i in range(n)]


def test_gone_after_three_misses_in_a_row_two_periods_apart() -> None:
    a = absences()
    assert misses(a, "x", STEADY, MISSES) == [False] * (MISSES - 1) + [True]
    assert a.missing() == {}  # forgotten once judged


def test_three_quick_misses_are_not_enough_without_the_span() -> None:
    a = absences()
    assert not a.missed("x", STEADY, HEARD)
    assert not a.missed("x", STEADY + 0.1, HEARD)
    assert not a.missed("x", STEADY + 0.2, HEARD)  # three misses within 0.2 s: a moment's gap
    assert a.missing() == {"x": 3}
    assert a.missed("x", STEADY + 2 * EVERY_S, HEARD)


def test_an_answer_starts_the_count_again() -> None:
    a = absences()
    assert misses(a, "x", STEADY, MISSES - 1) == [False] * (MISSES - 1)
    a.answered("x")
    assert a.missing() == {}
    start = STEADY + MISSES * EVERY_S
    assert misses(a, "x", start, MISSES) == [False] * (MISSES - 1) + [True]


def test_an_agent_heard_since_its_first_miss_starts_again() -> None:
    a = absences()
    assert not a.missed("x", STEADY, HEARD)
    assert not a.missed("x", STEADY + 1, HEARD)
    # its state arrived after the first miss (it reconnected, or restarted): not the same absence
    assert not a.missed("x", STEADY + 2, STEADY + 1.5)
    assert a.missing() == {"x": 1}
    assert not a.missed("x", STEADY + 3, STEADY + 1.5)
    assert a.missed("x", STEADY + 4, STEADY + 1.5)


def test_no_miss_counts_while_the_registry_itself_has_just_reconnected() -> None:
    a = absences()
    assert misses(a, "x", T0, int(SETTLE_S)) == [False] * int(SETTLE_S)  # within SETTLE_S of its start
    assert a.missing() == {}
    assert misses(a, "x", STEADY, MISSES - 1) == [False] * (MISSES - 1)
    back = STEADY + 10
    a.reconnected(back)
    assert a.missing() == {}  # what it found before the reconnect is forgotten
    assert not a.missed("x", back + SETTLE_S - 0.01, HEARD)
    assert misses(a, "x", back + SETTLE_S, MISSES) == [False] * (MISSES - 1) + [True]


def test_each_agent_counts_apart_and_those_gone_from_the_fleet_are_forgotten() -> None:
    a = absences()
    assert not a.missed("x", STEADY, HEARD)
    assert not a.missed("y", STEADY, HEARD)
    assert not a.missed("y", STEADY + 1, HEARD)
    assert a.missing() == {"x": 1, "y": 2}
    a.keep({"y"})
    assert a.missing() == {"y": 2}
    assert a.missed("y", STEADY + 2, HEARD)
    assert not a.missed("x", STEADY + 2, HEARD)  # x starts afresh
