"""The aggregator's rolling figures: rates over the time actually watched, TTFT p50 and p95."""

from __future__ import annotations

import pytest
from corral import views
from corral.aggregator.aggregator import Window, fuller
from corral.protocol.messages import RequestFinished


def _done(ttft_ms: float, tokens: int = 10, status: int = 200) -> RequestFinished:
    return RequestFinished(
        agent="a1", model="llama3.2:latest", endpoint="/api/generate", status=status,
        ttft_ms=ttft_ms, eval_count=tokens,
    )  # fmt: skip


def test_a_young_window_divides_by_the_time_it_watched_not_by_its_length() -> None:
    w = Window(60.0, started=1000.0)
    for i in range(10):
        w.add(_done(100.0), 1000.0 + i * 0.5)
    r = w.rates(1005.0)  # five seconds of watching
    assert r.window_s == 5.0
    assert r.requests_per_s == 2.0 and r.tokens_per_s == 20.0
    old = w.rates(1005.0 + 60.0)  # a full window later: the samples have aged out
    assert old.window_s == 60.0 and old.requests == 0


def test_ttft_p50_and_p95() -> None:
    w = Window(60.0, started=0.0)
    for i in range(1, 101):  # 1 .. 100 ms
        w.add(_done(float(i)), 100.0)
    w.add(_done(5000.0, status=500), 100.0)  # a failed request's TTFT is not a TTFT
    r = w.rates(100.0)
    assert r.ttft_ms_p50 == pytest.approx(50.5)
    assert r.ttft_ms_p95 == pytest.approx(95.05)
    assert r.per_model["llama3.2:latest"].ttft_ms_p95 == r.ttft_ms_p95
    one = Window(60.0, started=0.0)
    one.add(_done(42.0), 10.0)
    assert one.rates(10.0).ttft_ms_p95 == 42.0


def _rates(window_s: float, every_s: float = 1.0) -> views.Rates:
    return views.Rates(
        window_s=window_s,
        requests=0,
        errors=0,
        tokens=0,
        requests_per_s=0.0,
        tokens_per_s=0.0,
        every_s=every_s,
    )


def test_a_new_copy_defers_to_fresh_figures_that_cover_more_of_the_window() -> None:
    stored = _rates(60.0)
    assert fuller(_rates(5.0), stored, 2.0, 60.0) is stored


def test_it_writes_its_own_once_its_window_is_full_or_the_others_cover_no_more() -> None:
    assert fuller(_rates(60.0), _rates(60.0), 0.5, 60.0) is None
    assert fuller(_rates(5.0), _rates(4.0), 0.5, 60.0) is None
    assert fuller(_rates(5.0), None, 0.0, 60.0) is None


def test_it_does_not_defer_to_a_copy_that_stopped_rewriting_them() -> None:
    assert fuller(_rates(5.0), _rates(60.0, every_s=1.0), 6.0, 60.0) is None  # five periods unwritten
