"""The report: per workload a table of the policies' figures, auto's ratios against the baselines
and peer routers, a verdict line and a line against each peer; for conversations the prompt eval
per turn; the JSON entry with every request; at the end auto's ratios per workload side by side
(`comparison`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from corral.simulator import SimConfig

from bench.common import fmt, percentile, table
from bench.routing.ideal import Job, beside, ideal_p95
from bench.routing.results import RunResult, sample_json
from bench.routing.workloads import Workload

BASELINES = ("round_robin", "random")  # the strategies auto is measured against
PEERS = ("herd",)  # other routers, run on the same simulators (`bench.routing.peer`)
COMPARED = BASELINES + PEERS

COLUMNS: tuple[tuple[str, str, bool], ...] = (
    # (summary key, header, higher is better)
    ("ttft_p50_s", "TTFT p50 (s)", False),
    ("ttft_p95_s", "TTFT p95 (s)", False),
    ("e2e_p95_s", "e2e p95 (s)", False),
    ("tokens_per_s", "tokens/s", True),
    ("cold_loads", "cold loads", False),
    ("reloads", "reloads", False),
    ("evictions", "evictions", False),
    ("partial_offloads", "partial offloads", False),
    ("errors", "errors", False),
)


def ratio(a: float, b: float) -> float:
    if a != a or b != b or b == 0:  # NaN or no baseline
        return math.nan
    return a / b


def verdict(summaries: dict[str, dict[str, Any]]) -> str:
    """Auto passes when it beats every baseline present on TTFT p95 and tokens/s, with 0 errors."""
    auto = summaries.get("auto")
    bases = [b for b in BASELINES if b in summaries]
    if auto is None or not bases:
        return "verdict: needs auto and a baseline"
    parts = []
    passed = auto["errors"] == 0
    for b in bases:
        s = summaries[b]
        t_ok = auto["ttft_p95_s"] < s["ttft_p95_s"]
        r_ok = auto["tokens_per_s"] > s["tokens_per_s"]
        passed &= t_ok and r_ok
        parts.append(
            f"TTFT p95 {'<' if t_ok else '>='} {b} ({fmt(auto['ttft_p95_s'])} vs {fmt(s['ttft_p95_s'])} s), "
            f"tokens/s {'>' if r_ok else '<='} {b} ({fmt(auto['tokens_per_s'])} vs {fmt(s['tokens_per_s'])})"
        )
    parts.append(f"auto errors {auto['errors']}")
    return f"verdict: {'PASS' if passed else 'MISS'} — " + "; ".join(parts)


def workload_table(results: Sequence[RunResult]) -> tuple[str, dict[str, Any]]:
    """The policies' figures and auto's ratios as text, and as the JSON entry's start."""
    summaries = {r.policy: r.summary() for r in results}
    header = ["policy", "requests", *(h for _, h, _ in COLUMNS)]
    rows: list[list[str]] = []
    for policy, s in summaries.items():
        cells = [policy, str(s["requests"])]
        for key, _, _ in COLUMNS:
            v = s[key]
            cells.append(str(v) if isinstance(v, int) else fmt(v))
        rows.append(cells)
    ratios: dict[str, dict[str, float]] = {}
    if "auto" in summaries:
        for b in COMPARED:
            if b not in summaries:
                continue
            rs = {
                key: ratio(float(summaries["auto"][key]), float(summaries[b][key])) for key, _, _ in COLUMNS
            }
            ratios[f"auto/{b}"] = rs
            rows.append([f"auto ÷ {b}", ""] + [times(rs[key]) for key, _, _ in COLUMNS])
    lines = [verdict(summaries), *(peer_line(summaries, p) for p in PEERS if p in summaries)]
    text = table(header, rows) + "\n" + "\n".join(lines)
    return text, {"policies": summaries, "ratios": ratios, "verdict": verdict(summaries)}


def peer_line(summaries: dict[str, dict[str, Any]], peer: str) -> str:
    """Auto against one peer router: the TTFT p95 and throughput ratios, loads and errors."""
    auto = summaries.get("auto")
    if auto is None:
        return f"against {peer}: needs auto"
    s = summaries[peer]
    t = ratio(float(auto["ttft_p95_s"]), float(s["ttft_p95_s"]))
    r = ratio(float(auto["tokens_per_s"]), float(s["tokens_per_s"]))
    return (
        f"against {peer}: auto ÷ {peer} TTFT p95 {times(t)}, tokens/s {times(r)}; "
        f"cold loads {count(auto['cold_loads'])} vs {count(s['cold_loads'])}, "
        f"evictions {count(auto['evictions'])} vs {count(s['evictions'])}, "
        f"errors {auto['errors']} vs {s['errors']}"
    )


def focus_line(
    model: str, results: Sequence[RunResult], sims: Sequence[SimConfig] = (), loaded: Sequence[str] = ()
) -> tuple[str, dict[str, float]]:
    """The TTFT p95 of ``model``'s requests alone under each policy, with auto's ratio to each, and
    (given the fleet's ``sims``) the `ideal` schedule's for the same requests; with ``loaded`` (the
    busy models already loaded everywhere), also the ideal of a first-come-first-served router that
    evicts none of them (``ideal_fcfs_beside``)."""
    p95 = {r.policy: percentile([s.ttft for s in r.ok if s.model == model], 95) for r in results}
    parts = []
    for policy, v in p95.items():
        part = f"{policy} {fmt(v)} s"
        if policy != "auto" and "auto" in p95:
            part += f" (auto ÷ {policy} {times(ratio(p95['auto'], v))})"
        parts.append(part)
    line = f"{model} requests alone, TTFT p95: " + "; ".join(parts)
    jobs = focus_jobs(model, results)
    if sims and jobs:
        best = ideal_p95(sims, model, jobs)
        p95["ideal"] = best
        line += (
            f"\nideal schedule for the same requests (every server with {model} on disk loading it at "
            f"once, nothing to evict, slots refilled instantly, shortest reply first): TTFT p95 "
            f"{fmt(best)} s"
        )
        room = beside(sims, model, loaded) if loaded else []
        if room:
            fair = ideal_p95(room, model, jobs, order="sent")
            p95["ideal_fcfs_beside"] = fair
            line += (
                f"\nthe same, first come first served and only on the {len(room)} servers where {model} "
                f"loads whole beside {', '.join(loaded)} (no busy model evicted): TTFT p95 {fmt(fair)} s"
            )
    return line, p95


def focus_jobs(model: str, results: Sequence[RunResult]) -> list[Job]:
    """``model``'s requests of one run, as `ideal` takes them: the first result whose first run
    answered every one of them (the workloads are seeded, so every run sends the same ones)."""
    for r in results:
        mine = [s for s in r.samples if s.model == model and s.run == 0]
        if mine and all(s.ok for s in mine):
            return [Job(s.prompt_eval_count, s.eval_count) for s in mine]
    return []


def times(x: float) -> str:
    """A ratio as the tables print it: ``0.52x``, or ``—`` without one."""
    return fmt(x) + ("x" if x == x else "")


def count(x: float) -> str:
    """A count, or a mean count per run (``--repeat``)."""
    return str(x) if isinstance(x, int) else fmt(x, 1)


def comparison(workloads: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Per workload (name → policy → summary), auto ÷ each baseline and peer present side by side:
    TTFT p95 and tokens/s ratios, then cold loads and errors of auto and of each of them."""
    present = [b for b in COMPARED if any(b in s and "auto" in s for s in workloads.values())]
    if not present:
        return ""
    header = ["workload"]
    for b in present:
        header += [f"TTFT p95 ÷ {b}", f"tokens/s ÷ {b}"]
    header += [f"cold loads auto / {' / '.join(present)}", f"errors auto / {' / '.join(present)}"]
    rows = []
    for name, s in workloads.items():
        auto = s.get("auto")
        if auto is None:
            continue
        row = [name]
        for b in present:
            other = s.get(b)
            if other is None:
                row += ["—", "—"]
                continue
            row += [
                times(ratio(float(auto["ttft_p95_s"]), float(other["ttft_p95_s"]))),
                times(ratio(float(auto["tokens_per_s"]), float(other["tokens_per_s"]))),
            ]
        row.append(" / ".join(count(s[p]["cold_loads"]) if p in s else "—" for p in ["auto", *present]))
        row.append(" / ".join(str(s[p]["errors"]) if p in s else "—" for p in ["auto", *present]))
        rows.append(row)
    return table(header, rows)


def chat_table(results: Sequence[RunResult]) -> tuple[str, list[dict[str, Any]]]:
    """Mean prompt eval seconds per turn index, one column per policy, and the cache share."""
    turns = {r.policy: r.turns() for r in results}
    n = max((len(t) for t in turns.values()), default=0)
    header = ["turn", "prompt tokens", *(f"{p} prompt eval (s)" for p in turns)]
    rows = []
    out = []
    for i in range(n):
        first = next((t[i] for t in turns.values() if len(t) > i), None)
        row = [str(i + 1), fmt(first["prompt_tokens"], 0) if first else "—"]
        entry: dict[str, Any] = {"turn": i + 1, "prompt_tokens": first["prompt_tokens"] if first else None}
        for p, t in turns.items():
            v = t[i]["prompt_eval_s"] if len(t) > i else math.nan
            row.append(fmt(v, 3))
            entry[p] = v
        rows.append(row)
        out.append(entry)
    share = ["cached prompt tokens", ""] + [
        f"{r.summary()['prompt_cache_share'] * 100:.0f}%" for r in results
    ]
    rows.append(share)
    text = table(header, rows) + "\n" + cache_verdict(results)
    return text, out


def cache_verdict(results: Sequence[RunResult]) -> str:
    """Under auto, later turns evaluate less prompt than the first turn (the history comes from the
    cache) and less than under each baseline present."""
    by = {r.policy: r for r in results}
    auto = by.get("auto")
    if auto is None:
        return "prompt cache: needs auto"
    first, later = auto.mean_prompt_eval(later=False), auto.mean_prompt_eval(later=True)
    passed = later < first
    parts = [f"auto: turn 1 {fmt(first, 3)} s, later turns {fmt(later, 3)} s"]
    for b in BASELINES:
        if b in by:
            bl = by[b].mean_prompt_eval(later=True)
            passed &= later < bl
            parts.append(f"{b}: later turns {fmt(bl, 3)} s")
    return f"prompt cache: {'PASS' if passed else 'MISS'} — mean prompt eval " + "; ".join(parts)


def section(
    workload: Workload[Any], results: Sequence[RunResult], sims: Sequence[SimConfig] = ()
) -> tuple[str, dict[str, Any]]:
    """One workload's part of the report: its text and its JSON entry (``sims``: the fleet it ran
    on, for the ideal schedule of a workload with a focus model)."""
    text, entry = workload_table(results)
    entry["agents"] = {r.policy: r.agents for r in results}
    entry["samples"] = {r.policy: [sample_json(x) for x in r.samples] for r in results}
    entry["warnings"] = {r.policy: r.warnings for r in results}
    if workload.focus is not None:
        line, entry["focus"] = focus_line(workload.focus, results, sims, workload.preload)
        text += "\n" + line
    if workload.per_turn:
        ctext, turns = chat_table(results)
        text += "\n\nprompt eval per turn (mean over conversations, simulated seconds):\n" + ctext
        entry["turns"] = turns
        entry["cache_verdict"] = cache_verdict(results)
    return f"## {workload.name}\n\n{text}", entry


def progress(r: RunResult) -> str:
    """One line per finished run, printed as the benchmark goes."""
    s = r.summary()
    spread = " ".join(f"{a}:{d['requests']}/{d['loads']}" for a, d in r.agents.items())
    warn = f" claim timeouts {s['claim_timeouts']}" if s["claim_timeouts"] else ""
    rest = f"+{r.policy} {r.cpu_peer_pct:.0f}%" if r.cpu_peer_pct else f"+nats {r.cpu_nats_pct:.0f}%"
    for kind, n in s["error_kinds"].items():
        warn += f"\n      {n} x {kind[:160]}"
    return (
        f"  {r.workload:<8} {r.policy:<16} {s['requests']:>4} req {s['errors']:>3} err "
        f"{r.wall_s:6.1f}s wall  cpu {r.cpu_self_pct:3.0f}% ({rest})"
        f"  requests/loads per agent: {spread}{warn}"
    )


def finite(obj: Any) -> Any:
    """JSON has no NaN: None instead."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj
