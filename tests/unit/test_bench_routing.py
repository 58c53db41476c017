"""The routing benchmark's pure parts: seeded workloads, reply parsing, the verdict (no sockets)."""

import random

from bench.routing import (
    BIG_MODEL,
    MACHINES,
    QUICK,
    RunResult,
    Sample,
    _parse,
    fleet_sims,
    plan_burst,
    plan_chats,
    plan_num_ctx,
    plan_skewed,
    pool,
    scaled_periods,
    verdict,
    zipf_weights,
)


def test_workloads_are_fixed_by_the_seed() -> None:
    for plan in (plan_skewed, plan_chats, plan_burst, plan_num_ctx):
        a = plan(random.Random("7/x"), QUICK)
        assert a == plan(random.Random("7/x"), QUICK)
        assert a != plan(random.Random("8/x"), QUICK)


def test_workload_shapes() -> None:
    rng = random.Random(1)
    skewed = plan_skewed(rng, QUICK)
    assert len(skewed) == QUICK.skewed_requests
    assert all(p.body["stream"] is True and "num_predict" in p.body["options"] for p in skewed)
    chats = plan_chats(rng, QUICK)
    assert len(chats) == QUICK.chats and all(len(c.turns) == QUICK.chat_turns for c in chats)
    assert all(c.turns[0].think_s == 0 for c in chats)
    assert {p.model for p in plan_burst(rng, QUICK)} == {BIG_MODEL}
    ctx = plan_num_ctx(rng, QUICK)
    assert all(p.body["options"].get("num_ctx") == p.num_ctx for p in ctx)


def test_zipf_weights() -> None:
    w = zipf_weights(6)
    assert abs(sum(w) - 1.0) < 1e-9
    assert w == sorted(w, reverse=True)


def test_fleet_is_mixed_and_the_small_card_lacks_the_big_model() -> None:
    sims = fleet_sims(seed=1, time_scale=0.5)
    assert len(sims) == len(MACHINES)
    assert {c.vendor for c in sims} == {"nvidia", "amd"}
    assert len({c.gpus[0].vram_gb for c in sims}) > 3
    for c in sims:
        big = next(m for m in c.models if m.name == BIG_MODEL)
        assert big.pulled == (c.gpus[0].vram_gb > 12)


def test_parse_a_stream() -> None:
    body = (
        b'{"model":"m","message":{"role":"assistant","content":"Hello"},"done":false}\n'
        b'{"model":"m","message":{"role":"assistant","content":" there"},"done":false}\n'
        b'{"model":"m","message":{"role":"assistant","content":""},"done":true,"eval_count":2,'
        b'"prompt_eval_count":10,"prompt_eval_duration":250000000,"load_duration":1000}\n'
    )
    s = Sample(model="m", status=200)
    assert _parse(body, s) == "Hello there"
    assert s.ok and s.eval_count == 2 and s.prompt_eval_count == 10 and s.prompt_eval_s == 0.25

    failed = Sample(model="m", status=200)
    assert _parse(b'{"response":"a","done":false}\n{"error":"agent went away"}\n', failed) == ""
    assert not failed.ok and failed.error == "agent went away"

    cut = Sample(model="m", status=200)
    _parse(b'{"response":"a","done":false}\n', cut)
    assert not cut.ok and "done" in cut.error

    busy = Sample(model="m", status=503)
    _parse(b'{"error":"server busy"}', busy)
    assert not busy.ok and busy.error == "server busy"


def test_verdict() -> None:
    def summary(p95: float, tps: float, errors: int = 0) -> dict[str, float]:
        return {"ttft_p95_s": p95, "tokens_per_s": tps, "errors": errors}

    good = {"auto": summary(1.0, 100.0), "round_robin": summary(2.0, 90.0), "random": summary(3.0, 80.0)}
    assert verdict(good).startswith("verdict: PASS")
    slower = good | {"random": summary(0.5, 80.0)}
    assert verdict(slower).startswith("verdict: MISS")
    errors = good | {"auto": summary(1.0, 100.0, errors=1)}
    assert verdict(errors).startswith("verdict: MISS")
    assert "needs" in verdict({"auto": summary(1.0, 1.0)})


def test_polling_periods_follow_the_simulated_clock() -> None:
    from corral.agent.settings import AgentSettings

    periods = scaled_periods(0.2)
    assert periods[AgentSettings]["refresh_s"] == AgentSettings().refresh_s * 0.2
    assert all(v >= 0.1 for fields in scaled_periods(0.001).values() for v in fields.values())


def test_pooled_repetitions() -> None:
    def result(ttft: float, loads: int) -> RunResult:
        samples = [
            Sample(model="m", ok=True, status=200, ttft=ttft, e2e=ttft + 1, eval_count=10) for _ in range(4)
        ]
        fleet = {"loads": loads, "reloads": 0, "evictions": 0, "prompt_tokens": 0, "prompt_tokens_cached": 0}
        return RunResult(
            workload="w",
            policy="auto",
            samples=samples,
            wall_s=1.0,
            scale=0.5,
            fleet=fleet,
            agents={"a": {"requests": 4, "loads": loads, "reloads": 0}},
            cpu_self_pct=10.0,
            cpu_nats_pct=1.0,
        )

    pooled = pool([result(1.0, 2), result(3.0, 4)])
    s = pooled.summary()
    assert s["requests"] == 8 and s["runs"] == 2 and s["cold_loads"] == 3.0
    assert s["tokens_per_s"] == 80 / 4.0  # 80 tokens over 2 × 2 simulated seconds
    assert s["ttft_p50_s"] == 2.0
    assert pooled.agents["a"]["loads"] == 6
    assert {x.run for x in pooled.samples} == {0, 1}
