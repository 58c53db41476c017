"""What one workload under one policy measured (`RunResult`), its summary figures, repetitions
pooled into one result (`pool`) and one request as the JSON file stores it (`sample_json`)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bench.common import percentile
from bench.routing.client import Sample


@dataclass
class RunResult:
    workload: str
    policy: str
    samples: list[Sample]
    wall_s: float
    scale: float
    fleet: dict[str, int]  # summed simulator counters during the workload
    agents: dict[str, dict[str, int]]  # per agent: requests started, loads, reloads
    cpu_self_pct: float  # this process (simulators, agents, gateway, load generator), % of one core
    cpu_nats_pct: float
    warnings: dict[str, int] = field(default_factory=dict)
    runs: int = 1  # repetitions pooled here (`pool`)
    cpu_peer_pct: float = 0.0  # a peer router's own processes (router and node agents), % of one core

    @property
    def sim_s(self) -> float:
        return self.wall_s / self.scale

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        ttft = [s.ttft for s in ok]
        e2e = [s.e2e for s in ok]
        tokens = sum(s.eval_count for s in ok)
        f = self.fleet
        return {
            "requests": len(self.samples),
            "errors": self.errors,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p95_s": percentile(ttft, 95),
            "e2e_p50_s": percentile(e2e, 50),
            "e2e_p95_s": percentile(e2e, 95),
            "tokens": tokens,
            "tokens_per_s": tokens / self.sim_s if self.sim_s > 0 else math.nan,
            "cold_loads": self._per_run(f["loads"] - f["reloads"]),
            "reloads": self._per_run(f["reloads"]),
            "evictions": self._per_run(f["evictions"]),
            "partial_offloads": self._per_run(f.get("partial_offloads", 0)),
            "runs": self.runs,
            "requests_waiting_on_load": sum(1 for s in ok if s.load_s >= 0.5),
            "prompt_cache_share": f["prompt_tokens_cached"] / f["prompt_tokens"]
            if f["prompt_tokens"]
            else 0.0,
            "duration_s": self.sim_s,
            "wall_s": self.wall_s,
            "cpu_self_pct": self.cpu_self_pct,
            "cpu_nats_pct": self.cpu_nats_pct,
            "cpu_peer_pct": self.cpu_peer_pct,
            "claim_timeouts": sum(n for k, n in self.warnings.items() if "no claim from" in k),
            "error_kinds": dict(Counter(s.error_kind for s in self.samples if not s.ok)),
        }

    def _per_run(self, n: int) -> int | float:
        return n if self.runs == 1 else n / self.runs

    def turns(self) -> list[dict[str, float]]:
        """Per turn index: mean prompt tokens, prompt eval seconds and TTFT (successful turns)."""
        by: dict[int, list[Sample]] = {}
        for s in self.ok:
            if s.turn >= 0:
                by.setdefault(s.turn, []).append(s)
        return [
            {
                "turn": t + 1,
                "n": len(v),
                "prompt_tokens": sum(s.prompt_eval_count for s in v) / len(v),
                "prompt_eval_s": sum(s.prompt_eval_s for s in v) / len(v),
                "ttft_s": sum(s.ttft for s in v) / len(v),
            }
            for t, v in sorted(by.items())
        ]

    def mean_prompt_eval(self, later: bool) -> float:
        """Mean prompt eval seconds of the first turns (``later`` False) or of all later turns."""
        v = [s.prompt_eval_s for s in self.ok if s.turn >= 0 and (s.turn > 0) == later]
        return sum(v) / len(v) if v else math.nan


def pool(runs: Sequence[RunResult]) -> RunResult:
    """Repetitions of one workload under one policy as one result: every request, the summed
    durations and counters (`RunResult.summary` reports loads per run)."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    for i, r in enumerate(runs):
        for x in r.samples:
            x.run = i
    wall = sum(r.wall_s for r in runs)
    warnings: Counter[str] = Counter()
    for r in runs:
        warnings.update(r.warnings)
    return RunResult(
        workload=first.workload,
        policy=first.policy,
        samples=[x for r in runs for x in r.samples],
        wall_s=wall,
        scale=first.scale,
        fleet={k: sum(r.fleet[k] for r in runs) for k in first.fleet},
        agents={a: {k: sum(r.agents[a][k] for r in runs) for k in first.agents[a]} for a in first.agents},
        cpu_self_pct=sum(r.cpu_self_pct * r.wall_s for r in runs) / wall if wall > 0 else 0.0,
        cpu_nats_pct=sum(r.cpu_nats_pct * r.wall_s for r in runs) / wall if wall > 0 else 0.0,
        warnings=dict(warnings),
        runs=len(runs),
        cpu_peer_pct=sum(r.cpu_peer_pct * r.wall_s for r in runs) / wall if wall > 0 else 0.0,
    )


def sample_json(s: Sample) -> dict[str, Any]:
    """One request for the JSON file (times in simulated seconds, rounded to the millisecond)."""
    out: dict[str, Any] = {"model": s.model, "ok": s.ok, "t_start": round(s.t_start, 3)}
    if s.ok:
        out |= {
            "ttft": round(s.ttft, 3),
            "e2e": round(s.e2e, 3),
            "eval_count": s.eval_count,
            "prompt_eval_count": s.prompt_eval_count,
            "prompt_eval_s": round(s.prompt_eval_s, 3),
            "load_s": round(s.load_s, 3),
        }
    else:
        out["error"] = s.error_kind
    if s.num_ctx is not None:
        out["num_ctx"] = s.num_ctx
    if s.turn >= 0:
        out |= {"conv": s.conv, "turn": s.turn + 1}
    if s.run:
        out["run"] = s.run
    return out


def result_to_json(r: RunResult) -> bytes:
    """A whole `RunResult` as JSON, NaN kept (a failed request has no TTFT), for `result_from_json`."""
    return json.dumps(msgspec.to_builtins(r)).encode()


def result_from_json(data: bytes) -> RunResult:
    return msgspec.convert(json.loads(data), RunResult)
