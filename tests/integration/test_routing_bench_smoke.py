"""A smoke run of the routing benchmark: two tiny workloads under two policies, each on a fresh
fleet. Checks the figures' structure and that every request succeeded; no timing asserts."""

from __future__ import annotations

import random

import pytest
from corral.routing import Router
from corral.up import LocalFleet

from bench.routing.fleet import fleet_options
from bench.routing.report import workload_table
from bench.routing.run import run_one
from bench.routing.workloads import WORKLOADS, Chat, Knobs, Skewed

pytestmark = pytest.mark.integration

TINY = Knobs(
    skewed_requests=8,
    skewed_concurrency=4,
    chats=2,
    chat_turns=2,
    burst=4,
    num_ctx_requests=4,
    num_ctx_concurrency=2,
)
SEED = 3


def _expected(workload: str) -> tuple[int, int]:
    """(requests, generated tokens) the workload must produce: num_predict decides every reply."""
    rng = random.Random(f"{SEED}/{workload}")
    if workload == "skewed":
        plans = Skewed().plan(rng, TINY)
        return len(plans), sum(p.body["options"]["num_predict"] for p in plans)
    convs = Chat().plan(rng, TINY)
    return sum(len(c.turns) for c in convs), sum(t.num_predict for c in convs for t in c.turns)


@pytest.mark.parametrize("workload", ["skewed", "chat"])
async def test_routing_bench_smoke(workload: str) -> None:
    results = [
        await run_one(WORKLOADS[workload], policy, seed=SEED, time_scale=0.05, knobs=TINY, cap=60.0)
        for policy in ("auto", "round_robin")
    ]
    requests, tokens = _expected(workload)
    for r in results:
        s = r.summary()
        assert s["errors"] == 0, s["error_kinds"]
        assert s["requests"] == requests
        assert s["tokens"] == tokens
        assert s["ttft_p95_s"] >= s["ttft_p50_s"] > 0
        assert sum(a["requests"] for a in r.agents.values()) == requests
    text, entry = workload_table(results)
    assert "auto ÷ round_robin" in text and "verdict:" in text
    assert set(entry["policies"]) == {"auto", "round_robin"}
    assert set(entry["ratios"]) == {"auto/round_robin"}
    if workload == "chat":
        turns = results[0].turns()
        assert [t["turn"] for t in turns] == [1, 2]
        assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"]  # the history grows


async def test_the_gateway_routes_with_the_benchs_seeded_router() -> None:
    options = fleet_options(SEED, time_scale=0.05)
    assert isinstance(options.router, Router)
    async with LocalFleet(options) as fleet:
        assert fleet.gateway is not None
        assert fleet.gateway.planner.router is options.router
