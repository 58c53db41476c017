"""The rule that decides a job's requester is gone, from the probes that met no responders."""

from __future__ import annotations

from corral.agent.probes import MISSES, Probes


def sent(probes: Probes, count: int) -> list[int]:
    return [probes.next() for _ in range(count)]


def test_the_requester_is_gone_only_after_misses_in_a_row() -> None:
    p = Probes()
    numbers = sent(p, MISSES)
    assert numbers == list(range(MISSES))
    assert [p.missed(n) for n in numbers] == [False] * (MISSES - 1) + [True]
    assert p.gone


def test_a_probe_that_reached_the_requester_starts_the_count_again() -> None:
    """A requester reconnecting to NATS misses a few probes, then hears the next: still there."""
    p = Probes()
    sent(p, 2 * MISSES)
    for n in range(MISSES - 1):
        assert not p.missed(n)
    # probe MISSES - 1 reached it (no answer came); the later ones did not
    assert not any(p.missed(n) for n in range(MISSES, 2 * MISSES - 1))
    assert not p.gone
    assert p.missed(2 * MISSES - 1)


def test_answers_for_probes_never_sent_or_already_counted_change_nothing() -> None:
    p = Probes()
    sent(p, MISSES)
    assert not p.missed(MISSES)  # never sent
    for _ in range(MISSES):
        assert not p.missed(0)  # the same answer again (a duplicate) is one miss
    assert not p.gone
    assert not p.missed(-1)


def test_a_claim_nobody_heard_is_enough() -> None:
    """Nobody heard the claim: a requester that is there after all takes the request for unclaimed
    and sends it elsewhere, so the agent drops it at once; a ping nobody heard is not enough."""
    claimed = Probes()
    assert claimed.missed(claimed.claim()) and claimed.gone
    pinged = Probes()
    pinged.claim()
    assert not pinged.missed(pinged.next()) and not pinged.gone
