"""The reconnect backoff every Corral connection uses: doubling, capped, jittered."""

from __future__ import annotations

import random

from corral.runtime.nats import RECONNECT_FIRST_S, RECONNECT_MAX_S, reconnect_delay


def test_the_first_attempt_is_at_once_then_the_wait_doubles_to_its_cap() -> None:
    assert reconnect_delay(0) == 0.0
    for attempts in range(1, 12):
        full = min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** (attempts - 1))
        waits = [reconnect_delay(attempts, rng=random.Random(seed)) for seed in range(50)]
        assert all(full / 2 <= w <= full for w in waits), (attempts, full, min(waits), max(waits))
    assert (RECONNECT_FIRST_S, RECONNECT_MAX_S) == (0.25, 2.0)  # what the README says


def test_the_jitter_spreads_a_fleet_that_lost_its_server() -> None:
    waits = {round(reconnect_delay(5, rng=random.Random(seed)), 6) for seed in range(20)}
    assert len(waits) > 10
