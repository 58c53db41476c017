"""The routing benchmark's pure parts: seeded workloads, the fleet's options (scaled periods, the
seeded router), reply parsing, pooling and the verdict (no sockets)."""

import math
import random
from pathlib import Path
from typing import Any

import pytest
from corral.agent.settings import AgentSettings
from corral.aggregator.settings import AggregatorSettings
from corral.gateway.settings import GatewaySettings
from corral.protocol.messages import AgentState
from corral.registry.settings import RegistrySettings
from corral.routing import Route, Router
from corral.runtime.settings import describe
from corral.simulator import SimConfig, load_config
from corral.simulator.config import GB
from corral.simulator.engine import share

from bench.routing.cli import POLICIES, VALID, split
from bench.routing.client import Sample, parse_reply
from bench.routing.fleet import BIG_MODEL, FLEET_SETTINGS, MACHINES, fleet_options, fleet_sims, scaled_periods
from bench.routing.herd import (
    install_commands,
    installed,
    node_argv,
    node_env,
    router_argv,
    router_env,
    scaled,
)
from bench.routing.ideal import Job, beside, first_tokens, ideal_p95
from bench.routing.netns import exec_argv
from bench.routing.peer import child_argv, child_parser, log_warnings, models_loaded, node_ids, nodes_ready
from bench.routing.report import comparison, focus_line, peer_line, verdict
from bench.routing.results import RunResult, pool, result_from_json, result_to_json
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
    assert periods == 6
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


# -- the herd peer: its configuration, command lines, result transport and the report's lines ------------
def test_herd_settings_keep_the_workload_and_the_model_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_AUTO_PULL", "true")
    monkeypatch.setenv("SOME_TOKEN", "secret")
    venv, home = Path("/v"), Path("/h")
    env = router_env(venv, home, time_scale=0.2)
    assert env["HOME"] == "/h" and env["PATH"].startswith("/v/bin:")
    assert env["FLEET_TELEMETRY"] == env["FLEET_NODE_TELEMETRY"] == "false"
    assert env["FLEET_AUTO_PULL"] == env["FLEET_VRAM_FALLBACK"] == "false"
    assert env["FLEET_CONTEXT_PROTECTION"] == "warn"  # 'strip' may switch to another model
    assert env["FLEET_THINKING_OVERHEAD"] == "1" and env["FLEET_THINKING_MIN_PREDICT"] == "0"
    assert env["FLEET_HEARTBEAT_INTERVAL"] == env["FLEET_REBALANCE_INTERVAL"] == "1"  # 5 s x 0.2
    assert "SOME_TOKEN" not in env  # nothing of this process's environment is inherited


def test_each_herd_node_reports_its_simulators_slots() -> None:
    sims = fleet_sims(seed=1, time_scale=0.2)
    for machine, sim in zip(MACHINES, sims, strict=True):
        env = node_env(Path("/v"), Path("/h"), machine, sim, time_scale=0.2)
        assert env["OLLAMA_NUM_PARALLEL"] == str(machine.parallel) == str(sim.num_parallel)
        assert env["OLLAMA_MAX_LOADED_MODELS"] == str(sim.max_loaded)
        assert env["FLEET_NODE_TELEMETRY"] == "false"
        assert env["FLEET_NODE_HEARTBEAT_INTERVAL"] == "1"
    # the periods keep the floor of Corral's own
    assert scaled({"X": 5.0}, 0.001) == {"X": "0.1"}


def test_herd_command_lines() -> None:
    venv = Path("/v")
    assert router_argv(venv, 4321) == [
        "/v/bin/herd",
        "--host",
        "127.0.0.1",
        "--port",
        "4321",
        "--log-level",
        "warning",
    ]
    node = node_argv(venv, "amd-1", "http://127.0.0.1:5000", "http://127.0.0.1:4321")
    assert node[0] == "/v/bin/herd-node"
    assert node[node.index("--node-id") + 1] == "amd-1"
    assert node[node.index("--ollama-host") + 1] == "http://127.0.0.1:5000"
    assert node[node.index("--router-url") + 1] == "http://127.0.0.1:4321"
    create, install = install_commands("/usr/bin/python3", Path("/c/herd"))
    assert create == ["/usr/bin/python3", "-m", "venv", "/c/herd"]
    assert install[0] == "/c/herd/bin/python" and install[-2:] == ["install", "ollama-herd==0.11.4"]
    assert not installed(Path("/nonexistent/herd"))
    assert node_ids() == ["nvidia-0", "amd-1", "nvidia-2", "amd-3", "nvidia-4", "nvidia-5"]


def test_the_peer_runs_in_a_namespace_with_the_same_fleet_arguments() -> None:
    argv = child_argv(
        "chat", seed=3, time_scale=0.2, cap=150.0, venv=Path("/v"), workdir=Path("/w"), quick=True
    )
    args = child_parser().parse_args(argv[3:])
    assert argv[1:3] == ["-m", "bench.routing.peer"]
    assert (args.workload, args.seed, args.time_scale, args.cap, args.quick) == ("chat", 3, 0.2, 150.0, True)
    assert exec_argv("ns1", ["x", "y"]) == ["ip", "netns", "exec", "ns1", "x", "y"]


def test_herd_readiness_from_its_fleet_status() -> None:
    def node(i: str, loaded: list[str], status: str = "online") -> dict[str, Any]:
        return {
            "node_id": i,
            "status": status,
            "ollama": {"models_available": ["a", "b"], "models_loaded": [{"name": m} for m in loaded]},
        }

    status = {"nodes": [node("n0", ["a"]), node("n1", ["a", "b"])]}
    assert nodes_ready(status, ["n0", "n1"])
    assert not nodes_ready(status, ["n0", "n1", "n2"])
    assert not nodes_ready({"nodes": [node("n0", [], status="degraded")]}, ["n0"])
    assert models_loaded(status, ["n0", "n1"], ["a"])
    assert not models_loaded(status, ["n0", "n1"], ["a", "b"])


def test_herd_warnings_are_counted_by_kind() -> None:
    lines = [
        '{"level": "WARNING", "logger": "fleet_manager.server.streaming", "msg": "retry 1 of 2 on amd-1"}',
        '{"level": "WARNING", "logger": "fleet_manager.server.streaming", "msg": "retry 2 of 2 on amd-1"}',
        '{"level": "INFO", "logger": "x", "msg": "fine"}',
        "not json",
    ]
    assert log_warnings(lines) == {"herd fleet_manager.server.streaming: retry N of N on amd-N": 2}


def test_a_run_result_crosses_the_process_boundary() -> None:
    failed = Sample(model="m", error="HTTP 503")
    done = Sample(model="m", ok=True, status=200, ttft=0.5, e2e=1.0, eval_count=9, turn=1)
    r = RunResult(
        workload="chat",
        policy="herd",
        samples=[failed, done],
        wall_s=2.0,
        scale=0.2,
        fleet={"loads": 1},
        agents={"nvidia-0": {"requests": 2, "loads": 1}},
        cpu_self_pct=10.0,
        cpu_nats_pct=0.0,
        warnings={"w": 1},
        cpu_peer_pct=30.0,
    )
    back = result_from_json(result_to_json(r))
    assert math.isnan(back.samples[0].ttft) and back.samples[0].error == "HTTP 503"
    assert back.samples[1] == done
    assert (back.agents, back.fleet, back.warnings, back.cpu_peer_pct) == (
        r.agents,
        r.fleet,
        r.warnings,
        30.0,
    )


def _summary(p95: float, tps: float, loads: int, errors: int = 0) -> dict[str, Any]:
    return {"ttft_p95_s": p95, "tokens_per_s": tps, "cold_loads": loads, "evictions": 0, "errors": errors}


def test_auto_against_herd_beside_auto_against_round_robin() -> None:
    workloads = {
        "skewed": {
            "auto": _summary(1.0, 120.0, 4),
            "round_robin": _summary(2.0, 100.0, 9),
            "herd": _summary(4.0, 60.0, 6, errors=2),
        },
        "burst": {"auto": _summary(3.0, 50.0, 2), "round_robin": _summary(3.0, 50.0, 5)},
    }
    text = comparison(workloads)
    header, _, skewed, burst = text.splitlines()
    assert "TTFT p95 ÷ round_robin" in header and "TTFT p95 ÷ herd" in header
    assert header.index("÷ round_robin") < header.index("÷ herd")
    assert [c.strip() for c in skewed.strip("|").split("|")] == [
        "skewed", "0.50x", "1.20x", "0.25x", "2.00x", "4 / 9 / 6", "0 / 0 / 2",
    ]  # fmt: skip
    assert [c.strip() for c in burst.strip("|").split("|")][3:] == ["—", "—", "2 / 5 / —", "0 / 0 / —"]
    assert comparison({"burst": {"auto": _summary(1.0, 1.0, 0)}}) == ""

    line = peer_line(workloads["skewed"], "herd")
    assert line.startswith("against herd: auto ÷ herd TTFT p95 0.25x, tokens/s 2.00x")
    assert line.endswith("cold loads 4 vs 6, evictions 0 vs 0, errors 0 vs 2")


def test_the_herd_policy_is_valid_but_not_run_by_default() -> None:
    assert "herd" in VALID and "herd" not in POLICIES
    assert split("auto,herd", VALID, "policy") == ["auto", "herd"]
    with pytest.raises(SystemExit):
        split("auto,herds", VALID, "policy")


def test_the_focus_line_reports_one_models_ttft_p95_alone_with_autos_ratios() -> None:
    def result(policy: str, burst_ttft: float) -> RunResult:
        samples = [Sample(model="steady", ok=True, status=200, ttft=0.1, e2e=1.0) for _ in range(20)]
        samples += [Sample(model="big", ok=True, status=200, ttft=burst_ttft, e2e=9.0) for _ in range(5)]
        samples.append(Sample(model="big", error="HTTP 503"))  # failures are not in the TTFT
        fleet = {"loads": 1, "reloads": 0, "evictions": 0, "prompt_tokens": 0, "prompt_tokens_cached": 0}
        return RunResult("steady_burst", policy, samples, 1.0, 1.0, fleet, {}, 0.0, 0.0)

    line, p95 = focus_line("big", [result("auto", 5.0), result("round_robin", 20.0)])
    assert p95 == {"auto": 5.0, "round_robin": 20.0}  # the steady requests' 0.1 s do not count
    assert line == "big requests alone, TTFT p95: auto 5.00 s; round_robin 20.00 s (auto ÷ round_robin 0.25x)"
    assert WORKLOADS["steady_burst"].focus == BIG_MODEL


def one_server(*, parallel: int = 1, pulled: bool = True, speed: float = 1.0) -> SimConfig:
    model = {"name": "m", "size_gb": 2.0, "pulled": pulled}
    return load_config(None, num_parallel=parallel, speed=speed, models=[model])


def test_the_ideal_schedule_on_one_slot_serves_the_shortest_reply_first() -> None:
    c = one_server()
    load, rate = c.load_seconds(2 * GB), c.stream_rate(2.0)
    long, short = Job(prompt_tokens=100, eval_count=50), Job(prompt_tokens=100, eval_count=10)
    prompt = 100 / c.prompt_factor
    got = first_tokens([c], "m", [long, short])
    # the short reply first, though it was sent second; the long one waits for all of it
    assert got[1] == pytest.approx(load + (prompt + 1) / rate)
    assert got[0] == pytest.approx(load + (prompt + 10) / rate + (prompt + 1) / rate)
    assert ideal_p95([c], "m", [long, short]) == pytest.approx(got[1] + 0.95 * (got[0] - got[1]))


def test_the_ideal_schedule_shares_a_runner_as_the_engine_does_and_uses_every_server_with_the_model() -> None:
    jobs = [Job(prompt_tokens=0, eval_count=20)] * 2
    two_slots = one_server(parallel=2)
    together = first_tokens([two_slots], "m", jobs)
    rate = two_slots.stream_rate(2.0) * share(2)  # two streams at once, each slower
    assert together == pytest.approx([two_slots.load_seconds(2 * GB) + 1 / rate] * 2)
    slow, fast = one_server(speed=0.5), one_server(speed=1.0)
    load, rate = fast.load_seconds(2 * GB), fast.stream_rate(2.0)
    assert slow.load_seconds(2 * GB) > load + 40 / rate  # the fast server is done before the slow one loads
    assert first_tokens([slow, fast], "m", jobs) == pytest.approx([load + 1 / rate, load + 21 / rate])
    both_fast = first_tokens([fast, one_server(speed=1.0)], "m", jobs)
    assert both_fast == pytest.approx([load + 1 / rate] * 2)  # two servers: one each, at once
    # a server without the model on disk takes nothing; none at all: no figure
    assert first_tokens([one_server(pulled=False), fast], "m", jobs) == pytest.approx(
        [load + 1 / rate, load + 21 / rate]
    )
    assert all(math.isnan(t) for t in first_tokens([one_server(pulled=False)], "m", jobs))


def test_first_come_first_served_the_ideal_takes_the_requests_in_the_order_sent() -> None:
    c = one_server()
    load, rate = c.load_seconds(2 * GB), c.stream_rate(2.0)
    long, short = Job(prompt_tokens=100, eval_count=50), Job(prompt_tokens=100, eval_count=10)
    prompt = 100 / c.prompt_factor
    got = first_tokens([c], "m", [long, short], order="sent")
    assert got[0] == pytest.approx(load + (prompt + 1) / rate)
    assert got[1] == pytest.approx(load + (prompt + 50) / rate + (prompt + 1) / rate)
    assert ideal_p95([c], "m", [long, short], order="sent") > ideal_p95([c], "m", [long, short])


def test_beside_keeps_the_servers_where_the_model_loads_whole_next_to_the_busy_one() -> None:
    """steady_burst's fleet: at an 8192 context phi4:14b does not fit within 80 % of what the busy
    llama3.2:3b leaves on the 16 GB card, while it does on the larger ones; at 4096 it fits there
    too; alone it fits wherever it is on disk (the 12 GB card has no copy)."""
    tight = fleet_sims(1, 0.2, 8192)
    sizes = [c.gpus[0].vram_gb for c in beside(tight, BIG_MODEL, ["llama3.2:3b"])]
    assert sizes == [24.0, 24.0, 32.0, 48.0]
    assert 16.0 in [c.gpus[0].vram_gb for c in beside(fleet_sims(1, 0.2, 4096), BIG_MODEL, ["llama3.2:3b"])]
    assert [c.gpus[0].vram_gb for c in beside(tight, BIG_MODEL, [])] == [24.0, 24.0, 16.0, 32.0, 48.0]


def test_the_focus_line_adds_the_ideal_schedule_for_the_requests_of_one_run() -> None:
    def sample(run: int, ok: bool = True) -> Sample:
        return Sample(
            model="m", ok=ok, status=200, ttft=3.0, e2e=4.0, eval_count=20, prompt_eval_count=50, run=run
        )

    fleet = {"loads": 1, "reloads": 0, "evictions": 0, "prompt_tokens": 0, "prompt_tokens_cached": 0}
    pooled = RunResult(
        "burst", "auto", [sample(0), sample(0), sample(1)], 1.0, 1.0, fleet, {}, 0.0, 0.0, runs=2
    )
    sims = [one_server(parallel=2)]
    line, p95 = focus_line("m", [pooled], sims)
    assert p95["ideal"] == pytest.approx(ideal_p95(sims, "m", [Job(50, 20)] * 2))  # run 0's two requests
    assert line.endswith(f"TTFT p95 {p95['ideal']:.2f} s")
    failed = RunResult("burst", "auto", [sample(0), sample(0, ok=False)], 1.0, 1.0, fleet, {}, 0.0, 0.0)
    assert "ideal" not in focus_line("m", [failed], sims)[1]  # a run that lost a request has no job list
    assert "ideal_fcfs_beside" not in p95  # no busy model named: no such line


def test_the_focus_line_beside_busy_models_adds_the_first_come_first_served_ideal_on_the_room_left() -> None:
    jobs = [Job(100, 96 - 3 * i) for i in range(30)]  # more than the slots, the longest sent first
    samples = [
        Sample(model=BIG_MODEL, ok=True, status=200, ttft=9.0, e2e=9.5, eval_count=j.eval_count,
               prompt_eval_count=j.prompt_tokens)
        for j in jobs
    ]  # fmt: skip
    fleet = {"loads": 1, "reloads": 0, "evictions": 0, "prompt_tokens": 0, "prompt_tokens_cached": 0}
    result = RunResult("steady_burst", "auto", samples, 1.0, 1.0, fleet, {}, 0.0, 0.0)
    sims = fleet_sims(1, 0.2, 8192)
    line, p95 = focus_line(BIG_MODEL, [result], sims, ["llama3.2:3b"])
    room = beside(sims, BIG_MODEL, ["llama3.2:3b"])
    assert p95["ideal_fcfs_beside"] == pytest.approx(ideal_p95(room, BIG_MODEL, jobs, order="sent"))
    assert p95["ideal_fcfs_beside"] > p95["ideal"]
    assert line.endswith(f"on the 4 servers where {BIG_MODEL} loads whole beside llama3.2:3b (no busy model "
                         f"evicted): TTFT p95 {p95['ideal_fcfs_beside']:.2f} s")  # fmt: skip
