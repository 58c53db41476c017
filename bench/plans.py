"""The registry's replica and rebalancing plans on large fleets: time per plan as the fleet grows.

A backlog's replica plan (`corral.routing.plan_replicas`, with the measured demand) asks of every
candidate card whether its load would evict slots another model's demand needs (`frees_for`); that
needs each model's serving slots over the whole fleet. Worked out again per candidate (the baseline
here, in the same run: `frees_for` without ``serving``), a plan grew with the square of the fleet:
2.6 s at 1,000 cards, in a registry that also answers placements and heartbeats. Now once per plan.
The rebalancing's plan (`plan_move`) is timed beside them.

The fleet: N cards of 24 GB with two 14 GB models on disk, a quarter serving the waiting model and
the rest the other, both measured busy.

    .venv/bin/python -m bench.plans [--sizes 10,100,1000] [--repeat N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from corral.protocol.messages import AgentState, Gpu, PsModel, TagModel
from corral.protocol.names import parse_name
from corral.routing import Demand, Route, Router, frees_for, load_plan, plan_move, plan_replicas

GB = 1_000_000_000
WAITS, OTHER = parse_name("qwen3:8b"), parse_name("llama3.2")
SIZE = 14 * GB


def _card(i: int) -> AgentState:
    serving = WAITS if i % 4 == 0 else OTHER
    runner = PsModel(
        name=serving.display,
        model=serving.display,
        size=SIZE,
        digest=serving.key,
        size_vram=SIZE,
        expires_at="",
    )
    return AgentState(
        id=f"card-{i:05d}",
        vendor="nvidia",
        host=f"h{i}",
        ollama_url=f"http://h{i}:11434",
        gpus=(Gpu(index=0, name="gpu", vendor="nvidia", vram_total=24 * GB, vram_free=10 * GB),),
        models=tuple(
            TagModel(name=m.display, model=m.display, modified_at="", size=SIZE, digest=m.key)
            for m in (WAITS, OTHER)
        ),
        loaded=(runner,),
        parallel=4,
    )


def _per_candidate(fleet: list[AgentState], demand: dict[str, Demand]) -> None:
    """The baseline: every candidate's check works the fleet's serving slots out again."""
    route, (sizes, _) = Route(key=WAITS.key), Router().observations(fleet)
    for a in fleet:
        frees_for(a, load_plan(route, a, sizes), fleet, frozenset(), demand=demand)


def _ms(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1000


def _row(n: int, repeat: int) -> str:
    fleet = [_card(i) for i in range(n)]
    demand = {WAITS.key: Demand(running=0.9 * n, waiting=50.0), OTHER.key: Demand(running=0.1 * n)}
    route = Route(key=WAITS.key)
    now = _ms(lambda: plan_replicas(route, fleet, 200, 2.0, fleet=fleet, demand=demand), repeat)
    base = _ms(lambda: _per_candidate(fleet, demand), repeat)
    move = _ms(lambda: plan_move(fleet, demand), repeat)
    return f"| {n:,} | {now:.1f} | {base:.1f} | {base / now:.1f}x | {move:.1f} |"


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.plans", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10,100,1000", help="fleet sizes (default 10,100,1000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is shown (default 3)")
    args = p.parse_args()
    print(
        "| cards | plan_replicas (ms) | baseline: checks alone, slots per candidate (ms) | ratio | plan_move (ms) |"
    )
    print("|---:|---:|---:|---:|---:|")
    for n in (int(s) for s in args.sizes.split(",")):
        print(_row(n, args.repeat))


if __name__ == "__main__":
    main()
