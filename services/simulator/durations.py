"""Go-compatible durations and timestamps: `keep_alive` parsing (Go's
`time.ParseDuration`, bare numbers as seconds) and the time formats Ollama writes.

Durations are float seconds here; "forever" (any negative keep_alive) is `FOREVER` (``math.inf``).
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from typing import Final

FOREVER: Final = math.inf
MAX_INT64: Final = (1 << 63) - 1

_UNITS: Final[dict[str, float]] = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class DurationError(ValueError):
    """A keep_alive Ollama rejects with 400; the message is Go's."""


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_go_duration(orig: str) -> float:
    """`time.ParseDuration`: ``"5m"``, ``"1h30m"``, ``"-1m"``, ``"0"``, ``"1.5s"`` → seconds."""
    s = orig
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise DurationError(f"time: invalid duration {_quote(orig)}")
    total = 0.0
    while s:
        if not (s[0] == "." or s[0].isdigit()):
            raise DurationError(f"time: invalid duration {_quote(orig)}")
        i = 0
        while i < len(s) and s[i].isdigit():
            i += 1
        whole, s = s[:i], s[i:]
        frac = ""
        if s.startswith("."):
            j = 1
            while j < len(s) and s[j].isdigit():
                j += 1
            frac, s = s[1:j], s[j:]
        if not whole and not frac:
            raise DurationError(f"time: invalid duration {_quote(orig)}")
        k = 0
        while k < len(s) and not (s[k] == "." or s[k].isdigit()):
            k += 1
        if k == 0:
            raise DurationError(f"time: missing unit in duration {_quote(orig)}")
        unit, s = s[:k], s[k:]
        if unit not in _UNITS:
            raise DurationError(f"time: unknown unit {_quote(unit)} in duration {_quote(orig)}")
        total += float(f"{whole or '0'}.{frac or '0'}") * _UNITS[unit]
    return -total if neg else total


def parse_keep_alive(value: object) -> float | None:
    """A request's `keep_alive`: None when absent/null, seconds otherwise, `FOREVER` when negative.

    Numbers are seconds; strings are Go durations (a unitless string other than "0" is a 400).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise DurationError("Unsupported type: 'bool'")
    if isinstance(value, int | float):
        return _bounded(float(value))
    if isinstance(value, str):
        return _bounded(parse_go_duration(value))
    if isinstance(value, dict):
        raise DurationError("Unsupported type: 'map[string]interface {}'")
    if isinstance(value, list):
        raise DurationError("Unsupported type: '[]interface {}'")
    raise DurationError(f"Unsupported type: '{type(value).__name__}'")


def parse_server_keep_alive(value: str) -> float:
    """`OLLAMA_KEEP_ALIVE`: like a request's, but unitless integers are seconds too."""
    try:
        secs = float(int(value))
    except ValueError:
        secs = parse_go_duration(value)
    return _bounded(secs)


def _bounded(secs: float) -> float:
    """Negative, or longer than a Go time.Duration can hold (MaxInt64 ns, ~292 years): forever."""
    return FOREVER if secs < 0 or secs * 1e9 >= MAX_INT64 or math.isnan(secs) else secs


class CreatedAt:
    """RFC3339Nano UTC stamps (``2024-09-12T21:17:29.110811Z``) for every streamed chunk, cheaply:
    the date-time prefix is formatted once per second, only the fraction per call."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        ns = time.time_ns()
        sec, frac = divmod(ns, 1_000_000_000)
        if sec != self._second:
            self._second = sec
            self._prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        if frac == 0:
            return self._prefix + "Z"
        return f"{self._prefix}.{frac:09d}".rstrip("0") + "Z"


def format_local(ts: float) -> str:
    """Server-local RFC3339Nano with offset (``2025-05-10T08:06:48.639712-07:00``), for
    `modified_at` / `expires_at`. ``math.inf`` means Go's now + MaxInt64 ns (year ≈ 2318)."""
    if math.isinf(ts):
        dt = datetime.now().astimezone() + timedelta(microseconds=MAX_INT64 // 1000)
    else:
        dt = datetime.fromtimestamp(ts).astimezone()
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        base += f".{dt.microsecond:06d}".rstrip("0")
    off = dt.strftime("%z")
    return base + (off[:3] + ":" + off[3:] if off not in ("", "+0000") else "Z")
