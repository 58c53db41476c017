"""The routing benchmark's pure parts: seeded workloads, the fleet's options (scaled periods, the
seeded router), reply parsing, pooling and the verdict (no sockets)."""

import random

import pytest
from corral.agent.settings import AgentSettings
from corral.aggregator.settings import AggregatorSettings
from corral.gateway.settings import GatewaySettings
from corral.protocol.messages import AgentState
from corral.registry.settings import RegistrySettings
from corral.routing import Route, Router
from corral.runtime.settings import describe

from bench.routing.client import Sample, parse_reply
from bench.routing.fleet import BIG_MODEL, FLEET_SETTINGS, MACHINES, fleet_options, fleet_sims, scaled_periods
from bench.routing.report import verdict
from bench.routing.results import RunResult, pool
from bench.routing.workloads import QUICK, WORKLOADS, Burst, Chat, NumCtx, Skewed, zipf_weights


@pytest.mark.parametrize("name", WORKLOADS)
def test_workloads_are_fixed_by_the_seed(name: str) -> None:
    w = WORKLOADS[name]
    a = w.plan(random.Random("7/x"), QUICK)
    assert a == w.plan(random.Random("7/x"), QUICK)
    assert a != w.plan(random.Random("8/x"), QUICK)


def test_workloads_are_named_in_the_order_they_run() -> None:
    assert list(WORKLOADS) == ["skewed", "chat", "burst", "steady_burst", "num_ctx"]
    assert all(w.name == name for name, w in WORKLOADS.items())
    assert [name for name, w in WORKLOADS.items() if w.per_turn] == ["chat"]


def test_workload_shapes() -> None:
    rng = random.Random(1)
    skewed = Skewed().plan(rng, QUICK)
    assert len(skewed) == QUICK.skewed_requests
    assert all(p.body["stream"] is True and "num_predict" in p.body["options"] for p in skewed)
    chats = Chat().plan(rng, QUICK)
    assert len(chats) == QUICK.chats and all(len(c.turns) == QUICK.chat_turns for c in chats)
    assert all(c.turns[0].think_s == 0 for c in chats)
    assert {p.model for p in Burst().plan(rng, QUICK)} == {BIG_MODEL}
    ctx = NumCtx().plan(rng, QUICK)
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
    assert parse_reply(body, s) == "Hello there"
    assert s.ok and s.eval_count == 2 and s.prompt_eval_count == 10 and s.prompt_eval_s == 0.25

    failed = Sample(model="m", status=200)
    assert parse_reply(b'{"response":"a","done":false}\n{"error":"agent went away"}\n', failed) == ""
    assert not failed.ok and failed.error == "agent went away"

    cut = Sample(model="m", status=200)
    parse_reply(b'{"response":"a","done":false}\n', cut)
    assert not cut.ok and "done" in cut.error

    busy = Sample(model="m", status=503)
    parse_reply(b'{"error":"server busy"}', busy)
    assert not busy.ok and busy.error == "server busy" and busy.error_kind == "HTTP 503: server busy"


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
    periods = scaled_periods(0.2)
    assert periods[AgentSettings]["refresh_s"] == AgentSettings().refresh_s * 0.2
    assert all(v >= 0.1 for fields in scaled_periods(0.001).values() for v in fields.values())


def test_every_declared_period_is_scaled_and_nothing_else() -> None:
    """Built from the fleet's options, each settings class has every field declared a period at
    default × scale and every other field (timeouts among them) at its default."""
    scale = 0.25
    options = fleet_options(seed=1, time_scale=scale)
    assert options.registry is not None and options.aggregator is not None
    built = {
        AgentSettings: AgentSettings(**options.agent),
        RegistrySettings: RegistrySettings(**options.registry),
        GatewaySettings: GatewaySettings(**options.gateway),
        AggregatorSettings: AggregatorSettings(**options.aggregator),
    }
    assert set(built) == set(FLEET_SETTINGS)
    periods = 0
    for cls, settings in built.items():
        for s in describe(cls).values():
            value = getattr(settings, s.name)
            if s.period:
                periods += 1
                assert value == max(s.default * scale, 0.1), f"{cls.__name__}.{s.name} is not scaled"
            else:
                assert value == s.default, f"{cls.__name__}.{s.name} is no period but was changed"
    assert periods == 5
    gateway = built[GatewaySettings]
    assert gateway.claim_timeout_s == GatewaySettings().claim_timeout_s  # a timeout stays on the wall clock
    assert gateway.queue_recheck_s == GatewaySettings().queue_recheck_s * scale


def _agents(n: int) -> list[AgentState]:
    return [
        AgentState(id=f"a{i}", vendor="nvidia", host=f"h{i}", ollama_url=f"http://h{i}:11434")
        for i in range(n)
    ]


def _random_rankings(router: Router, draws: int = 20) -> list[list[str]]:
    agents, route = _agents(6), Route(key="m")
    return [[a.id for a in router.rank("random", route, agents, {})] for _ in range(draws)]


def test_the_random_strategy_is_seeded() -> None:
    assert _random_rankings(Router(seed=5)) == _random_rankings(Router(seed=5))
    assert _random_rankings(Router(seed=5)) != _random_rankings(Router(seed=6))


def test_the_fleet_hands_the_gateway_a_router_seeded_with_the_run_seed() -> None:
    router = fleet_options(seed=5, time_scale=0.2).router
    assert isinstance(router, Router)
    assert _random_rankings(router) == _random_rankings(Router(seed=5))
    assert fleet_options(seed=5, time_scale=0.2).router is not router  # a fresh one per fleet


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
