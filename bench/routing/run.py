"""One run: a workload under one policy on a fresh fleet, with the simulators' counters, the CPU of
this process and of the nats-server, and the fleet's warnings counted while the workload ran."""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from typing import Any

from corral.simulator import SimServer
from corral.up import LocalFleet

from bench.common import cpu_seconds
from bench.routing.client import Clients, Sample, strategy_headers
from bench.routing.fleet import MACHINES, address, agent_ids, fleet_options, prewarm, wait_ready
from bench.routing.results import RunResult
from bench.routing.workloads import Knobs, Workload

# the simulators' own counters (`SimServer.stats`) read before and after a workload
COUNTERS = (
    "started",
    "finished",
    "loads",
    "reloads",
    "evictions",
    "expirations",
    "load_aborts",
    "busy_rejections",
    "prompt_tokens",
    "prompt_tokens_evaluated",
    "prompt_tokens_cached",
    "generated_tokens",
)


class LogCounter(logging.Handler):
    """Counts warnings by logger and message template (e.g. the gateway's claim timeouts)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.name}: {record.msg}"] += 1


def counters(sims: list[SimServer]) -> list[dict[str, int]]:
    """Each simulator's `COUNTERS` now, with its loads placed partly in system RAM."""
    return [
        {k: int(getattr(sim.stats, k)) for k in COUNTERS} | {"partial_offloads": sim.stats.partial_loads}
        for sim in sims
    ]


def nats_cpu_seconds(fleet: LocalFleet) -> float:
    """The embedded nats-server's CPU seconds so far; 0 without one."""
    pid = fleet.nats.pid if fleet.nats is not None else None
    return cpu_seconds(pid) if pid else 0.0


async def run_one(
    workload: Workload[Any], policy: str, *, seed: int, time_scale: float, knobs: Knobs, cap: float = 150.0
) -> RunResult:
    """``workload`` under ``policy`` on a fresh fleet; ``cap`` bounds the workload in wall seconds."""
    rng = random.Random(f"{seed}/{workload.name}")  # the same requests for every policy
    counter = LogCounter()
    logging.getLogger().addHandler(counter)
    fleet = LocalFleet(fleet_options(seed, time_scale, workload.context_length))
    try:
        await fleet.start()
        await wait_ready(fleet, len(MACHINES))
        if workload.preload:
            await prewarm(fleet, workload.preload)
        host, port = address(fleet.url)
        ids = agent_ids(fleet)
        before = counters(fleet.sims)
        cpu0, nats0 = time.process_time(), nats_cpu_seconds(fleet)
        counter.counts.clear()
        plans = workload.plan(rng, knobs)
        clients = Clients(host, port, strategy_headers(policy), time_scale)
        samples, wall = await workload.drive(clients, plans, knobs, cap)
        cpu1, nats1 = time.process_time(), nats_cpu_seconds(fleet)
        after = counters(fleet.sims)
        warnings = dict(counter.counts)
    finally:
        logging.getLogger().removeHandler(counter)
        await fleet.stop()
    return run_result(
        workload.name,
        policy,
        samples,
        wall,
        time_scale,
        ids,
        before,
        after,
        cpu_self_pct=(cpu1 - cpu0) / wall * 100 if wall > 0 else 0.0,
        cpu_nats_pct=(nats1 - nats0) / wall * 100 if wall > 0 else 0.0,
        warnings=warnings,
    )


def run_result(
    workload: str,
    policy: str,
    samples: list[Sample],
    wall: float,
    time_scale: float,
    ids: list[str],
    before: list[dict[str, int]],
    after: list[dict[str, int]],
    *,
    cpu_self_pct: float,
    cpu_nats_pct: float = 0.0,
    cpu_peer_pct: float = 0.0,
    warnings: dict[str, int] | None = None,
) -> RunResult:
    """A run's figures from its samples and the simulators' counters before and after it (one
    entry per simulator, in the order of ``ids``)."""
    per_sim = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    return RunResult(
        workload=workload,
        policy=policy,
        samples=samples,
        wall_s=wall,
        scale=time_scale,
        fleet={k: sum(d[k] for d in per_sim) for k in per_sim[0]},
        agents={
            i: {"requests": d["started"]}
            | {k: d[k] for k in ("loads", "reloads", "evictions", "partial_offloads")}
            for i, d in zip(ids, per_sim, strict=True)
        },
        cpu_self_pct=cpu_self_pct,
        cpu_nats_pct=cpu_nats_pct,
        cpu_peer_pct=cpu_peer_pct,
        warnings=warnings or {},
    )
