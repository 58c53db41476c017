"""What the soak saw, as tables and verdicts: requests by kind and outcome, each process's RSS
after warm-up against its last value, and what the processes' logs hold.

Goals: zero lost unstarted requests, and no process's RSS more than `RSS_GROWTH_LIMIT` above its
value after warm-up. An agent this benchmark restarted is not judged on RSS (its warm-up and last
samples are of different processes); its peak is shown.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import fmt, percentile, table
from bench.soak.load import KINDS, Outcome, Record

RSS_GROWTH_LIMIT = 10.0  # percent, after warm-up
MIB = 1 << 20


@dataclass
class RssSample:
    t: float  # seconds since the load began
    pid: int
    rss: int  # bytes


@dataclass
class RssSeries:
    """One process name's samples over the run; a restarted agent's pids change."""

    name: str
    judged: bool = True  # False for the load generator itself (it keeps every record)
    samples: list[RssSample] = field(default_factory=list)

    def after(self, t: float) -> RssSample | None:
        return next((s for s in self.samples if s.t >= t), None)

    @property
    def last(self) -> RssSample | None:
        return self.samples[-1] if self.samples else None

    @property
    def peak(self) -> int:
        return max((s.rss for s in self.samples), default=0)


@dataclass(frozen=True)
class RssRow:
    name: str
    warm: int | None
    last: int | None
    peak: int
    growth: float | None  # percent; None when not judged
    verdict: str  # PASS, FAIL or a reason it is not judged

    def as_json(self) -> dict[str, Any]:
        return {
            "warm_bytes": self.warm,
            "last_bytes": self.last,
            "peak_bytes": self.peak,
            "growth_pct": self.growth,
            "verdict": self.verdict,
        }


def rss_rows(series: Sequence[RssSeries], warmup_s: float) -> list[RssRow]:
    rows = []
    for s in series:
        warm, last = s.after(warmup_s), s.last
        if warm is None or last is None:
            rows.append(RssRow(s.name, None, None, s.peak, None, "no sample after warm-up"))
            continue
        growth = (last.rss - warm.rss) / warm.rss * 100 if warm.rss else None
        if not s.judged:
            verdict = "not judged (the load generator keeps every record)"
        elif warm.pid != last.pid:
            runs = len({x.pid for x in s.samples})
            verdict = f"not judged (restarted; {runs} runs)"
        elif growth is None:
            verdict = "no RSS read"
        else:
            verdict = "PASS" if growth <= RSS_GROWTH_LIMIT else "FAIL"
        judged = verdict in ("PASS", "FAIL")
        rows.append(RssRow(s.name, warm.rss, last.rss, s.peak, growth if judged else None, verdict))
    return rows


@dataclass(frozen=True)
class Tally:
    """Requests of one kind (or all) by outcome, and latency of the completed ones."""

    completed: int
    failed_before: int
    failed_after: int
    p50_ms: float
    p99_ms: float

    @property
    def started(self) -> int:
        return self.completed + self.failed_after

    @property
    def sent(self) -> int:
        return self.started + self.failed_before

    @classmethod
    def of(cls, records: Sequence[Record]) -> Tally:
        n = Counter(r.outcome for r in records)
        lat = [r.latency_s for r in records if r.outcome is Outcome.COMPLETED]
        return cls(
            completed=n[Outcome.COMPLETED],
            failed_before=n[Outcome.FAILED_BEFORE_START],
            failed_after=n[Outcome.FAILED_AFTER_START],
            p50_ms=percentile(lat, 50) * 1e3,
            p99_ms=percentile(lat, 99) * 1e3,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "started": self.started,
            "completed": self.completed,
            "failed_before_start": self.failed_before,
            "failed_after_start": self.failed_after,
            "latency_ms_p50": None if self.p50_ms != self.p50_ms else round(self.p50_ms, 3),
            "latency_ms_p99": None if self.p99_ms != self.p99_ms else round(self.p99_ms, 3),
        }


def progress_line(
    elapsed_s: float, window: Sequence[Record], total: Tally, agents_up: int, agents: int, rss: dict[str, int]
) -> str:
    last = Tally.of(window)
    mem = " ".join(
        f"{name} {rss[name] / MIB:.0f}" for name in ("gateway", "nats-server", "registry") if name in rss
    )
    return (
        f"[{int(elapsed_s) // 60:3d}:{int(elapsed_s) % 60:02d}] last minute: {last.started} started, "
        f"{last.completed} completed, {last.failed_before} lost unstarted, {last.failed_after} failed after "
        f"start, p50 {fmt(last.p50_ms, 1)} ms, p99 {fmt(last.p99_ms, 1)} ms | total {total.started} started, "
        f"{total.failed_before} lost unstarted, {total.failed_after} failed after start | agents up "
        f"{agents_up}/{agents} | RSS MiB {mem}"
    )


_TRACEBACK = re.compile(r"^Traceback \(most recent call last\)", re.MULTILINE)
_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b")


@dataclass(frozen=True)
class LogScan:
    name: str
    tracebacks: int
    error_lines: int
    first_traceback: str  # its last line (the exception), for the report


def scan_logs(log_dir: Path, names: Sequence[str]) -> list[LogScan]:
    out = []
    for name in names:
        try:
            text = (log_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            continue
        first = ""
        m = _TRACEBACK.search(text)
        if m:
            tail = text[m.start() :].splitlines()
            # the exception line: the first non-indented line after the traceback header
            first = next((ln for ln in tail[1:] if ln and not ln.startswith(" ")), "")
        errors = sum(1 for ln in text.splitlines() if _ERROR.search(ln))
        out.append(LogScan(name, len(_TRACEBACK.findall(text)), errors, first))
    return out


@dataclass(frozen=True)
class Summary:
    text: str
    passed: bool
    data: dict[str, Any]


def summarize(
    records: Sequence[Record],
    series: Sequence[RssSeries],
    warmup_s: float,
    logs: Sequence[LogScan],
    exited: dict[str, int],
    kills: int,
    notes: Sequence[str] = (),
) -> Summary:
    parts: list[str] = []
    total = Tally.of(records)
    by_kind = {k.name: Tally.of([r for r in records if r.kind == k.name]) for k in KINDS}
    req_rows = [
        [
            name,
            t.sent,
            t.started,
            t.completed,
            t.failed_before,
            t.failed_after,
            fmt(t.p50_ms, 1),
            fmt(t.p99_ms, 1),
        ]
        for name, t in [*by_kind.items(), ("all", total)]
    ]
    parts.append(
        table(
            [
                "requests",
                "sent",
                "started",
                "completed",
                "lost unstarted",
                "failed after start",
                "p50 ms",
                "p99 ms",
            ],
            req_rows,
        )
    )
    errors = Counter(
        (r.outcome.value, _short(r.error)) for r in records if r.outcome is not Outcome.COMPLETED
    )
    if errors:
        parts.append(
            "failures by kind of error (first 12):\n"
            + table(["outcome", "error", "count"], [[o, e, n] for (o, e), n in errors.most_common(12)])
        )

    rows = rss_rows(series, warmup_s)
    parts.append(
        f"RSS (MiB): after warm-up = the first sample at or after {warmup_s:.0f} s; goal: growth ≤ "
        f"{RSS_GROWTH_LIMIT:.0f} %\n"
        + table(
            ["process", "after warm-up", "last", "peak", "growth %", "verdict"],
            [
                [
                    r.name,
                    fmt(r.warm / MIB, 1) if r.warm else "—",
                    fmt(r.last / MIB, 1) if r.last else "—",
                    fmt(r.peak / MIB, 1),
                    fmt(r.growth, 1) if r.growth is not None else "—",
                    r.verdict,
                ]
                for r in rows
            ],
        )
    )
    if logs:
        parts.append(
            "logs:\n"
            + table(
                ["process", "tracebacks", "ERROR lines", "first traceback's exception"],
                [[x.name, x.tracebacks, x.error_lines, x.first_traceback[:100] or "—"] for x in logs],
            )
        )

    parts.extend(notes)

    checks = [
        ("lost unstarted requests = 0", total.failed_before == 0, str(total.failed_before)),
        (
            f"RSS growth ≤ {RSS_GROWTH_LIMIT:.0f} % after warm-up, every judged process",
            all(r.verdict != "FAIL" for r in rows) and any(r.verdict == "PASS" for r in rows),
            ", ".join(f"{r.name} {r.growth:+.1f} %" for r in rows if r.growth is not None),
        ),
        (
            "no process exited by itself",
            not exited,
            ", ".join(f"{n} ({c})" for n, c in exited.items()) or "none",
        ),
        (
            "no traceback in any log",
            not any(x.tracebacks for x in logs),
            ", ".join(f"{x.name} {x.tracebacks}" for x in logs if x.tracebacks) or "none",
        ),
    ]
    passed = all(ok for _, ok, _ in checks)
    parts.append(
        "\n".join(f"{'PASS' if ok else 'FAIL'}  {what}: {detail}" for what, ok, detail in checks)
        + f"\n{'PASS' if passed else 'FAIL'}  overall ({kills} agent kills, {total.failed_after} streams "
        "cut by them or failed after start)"
    )
    data = {
        "requests": {name: t.as_json() for name, t in [*by_kind.items(), ("all", total)]},
        "failures": [{"outcome": o, "error": e, "count": n} for (o, e), n in errors.most_common()],
        "rss": {r.name: r.as_json() for r in rows},
        "logs": {x.name: {"tracebacks": x.tracebacks, "error_lines": x.error_lines} for x in logs},
        "exited": exited,
        "notes": list(notes),
        "checks": [{"goal": w, "pass": ok, "detail": d} for w, ok, d in checks],
        "pass": passed,
    }
    return Summary("\n\n".join(parts), passed, data)


def _short(error: str) -> str:
    """An error without the parts that differ per request (ids, numbers), to group by."""
    return re.sub(r"[0-9a-f]{8,}|\d+", "N", error)[:90]
