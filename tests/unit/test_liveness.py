"""`Absences`: when the registry takes an agent nothing answers for gone (no I/O, a given clock)."""

from __future__ import annotations

from corral.registry.liveness import ABSENT_S, MISSES, SETTLE_S, Absences, round_s

EVERY_S = 1.0
T0 = 100.0
STEADY = T0 + SETTLE_S  # the first moment a miss counts
HEARD = T0 - 50.0  # the agent's state last arrived long ago
SPAN = max(1.5 * EVERY_S, ABSENT_S)


def absences(every_s: float = EVERY_S) -> Absences:
    return Absences(every_s, T0)


def misses(a: Absences, agent: str, start: float, n: int, every_s: float = EVERY_S) -> list[bool]:
    return [a.missed(agent, start + i * every_s, HEARD) for i in range(n)]


def test_gone_after_three_misses_in_a_row_absent_s_apart() -> None:
    a = absences()
    assert SPAN >= MISSES * EVERY_S  # three probes alone are not enough at this period
    assert not any(misses(a, "x", STEADY, int(SPAN)))  # the first miss and the next SPAN - 1 s
    assert a.missed("x", STEADY + SPAN, HEARD)
    assert a.missing() == {}  # forgotten once judged


def test_a_long_probe_period_needs_three_probes_two_periods_apart() -> None:
    every_s = ABSENT_S  # 1.5 periods are longer than ABSENT_S
    a = absences(every_s)
    assert misses(a, "x", STEADY, MISSES, every_s) == [False] * (MISSES - 1) + [True]
    late = absences(every_s)  # the third answer a little early (the round's answers came quicker)
    assert not late.missed("x", STEADY, HEARD) and not late.missed("x", STEADY + every_s, HEARD)
    assert late.missed("x", STEADY + 2 * every_s - 0.2, HEARD)


def test_three_quick_misses_are_not_enough_without_the_span() -> None:
    a = absences()
    assert not a.missed("x", STEADY, HEARD)
    assert not a.missed("x", STEADY + 0.1, HEARD)
    assert not a.missed("x", STEADY + 0.2, HEARD)  # three misses within 0.2 s: a moment's gap
    assert a.missing() == {"x": 3}
    assert not a.missed("x", STEADY + SPAN - 0.01, HEARD)  # a reconnect takes up to this long
    assert a.missed("x", STEADY + SPAN, HEARD)


def test_an_answer_starts_the_count_again() -> None:
    a = absences()
    assert not any(misses(a, "x", STEADY, 3))
    a.answered("x")
    assert a.missing() == {}
    start = STEADY + 3
    assert not any(misses(a, "x", start, int(SPAN)))
    assert a.missed("x", start + SPAN, HEARD)


def test_an_agent_heard_since_its_first_miss_starts_again() -> None:
    a = absences()
    assert not a.missed("x", STEADY, HEARD)
    assert not a.missed("x", STEADY + 1, HEARD)
    # its state arrived after the first miss (it reconnected, or restarted): not the same absence
    back = STEADY + 1.5
    assert not a.missed("x", STEADY + 2, back)
    assert a.missing() == {"x": 1}
    assert not a.missed("x", STEADY + 2 + SPAN - 0.01, back)
    assert a.missed("x", STEADY + 2 + SPAN, back)


def test_no_miss_counts_while_the_registry_itself_has_just_reconnected() -> None:
    a = absences()
    assert not any(misses(a, "x", T0, int(SETTLE_S)))  # within SETTLE_S of its start
    assert a.missing() == {}
    assert not any(misses(a, "x", STEADY, 2))
    back = STEADY + 10
    a.reconnected(back)
    assert a.missing() == {}  # what it found before the reconnect is forgotten
    assert not a.missed("x", back + SETTLE_S - 0.01, HEARD)
    assert a.missing() == {}
    assert not any(misses(a, "x", back + SETTLE_S, int(SPAN)))
    assert a.missed("x", back + SETTLE_S + SPAN, HEARD)


def test_each_agent_counts_apart_and_those_gone_from_the_fleet_are_forgotten() -> None:
    a = absences()
    assert not a.missed("x", STEADY, HEARD)
    assert not a.missed("y", STEADY, HEARD)
    assert not a.missed("y", STEADY + 1, HEARD)
    assert a.missing() == {"x": 1, "y": 2}
    a.keep({"y"})
    assert a.missing() == {"y": 2}
    assert a.missed("y", STEADY + SPAN, HEARD)
    assert not a.missed("x", STEADY + SPAN, HEARD)  # x starts afresh


def test_a_large_fleet_is_probed_less_often_within_the_probe_budget() -> None:
    assert round_s(1.0, 100, 250.0) == 1.0  # within the budget: every probe_s
    assert round_s(1.0, 1000, 250.0) == 4.0  # 1,000 agents at 250 a second: each every 4 s
    assert round_s(1.0, 10_000, 0.0) == 1.0  # no budget


def test_a_longer_period_stretches_the_span_three_misses_need() -> None:
    every_s = 4.0  # a round of 1,000 agents at 250 probes a second
    a = absences()
    a.period(every_s)
    assert a.span_s == max(1.5 * every_s, ABSENT_S)
    assert misses(a, "x", STEADY, MISSES, every_s) == [False] * (MISSES - 1) + [True]
