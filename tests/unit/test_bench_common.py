"""The benchmarks' pure helpers (no sockets, no timing)."""

import math

from bench.common import fmt, percentile, table


def test_percentile_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 50) == 50.5
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))


def test_fmt_and_table() -> None:
    assert fmt(float("nan")) == "—"
    assert fmt(12345.6) == "12,346"
    assert fmt(0.123) == "0.12"
    out = table(["metric", "a"], [["x", "1"], ["longer", "22"]]).splitlines()
    assert out[0] == "| metric |  a |"
    assert out[1] == "|--------|----|"
    assert out[3] == "| longer | 22 |"
