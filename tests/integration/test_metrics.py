"""Prometheus /metrics and the X-Corral headers end to end: traffic through a real fleet, then the
gateway's, a second gateway's, an agent's and the aggregator's exposition read by Prometheus's own
parser."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from corral import views
from corral.agent.metrics import registry_for
from corral.gateway.app import Gateway
from corral.gateway.settings import GatewaySettings
from corral.protocol.names import parse_name
from corral.runtime.metricsserver import serve_metrics
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims
from prometheus_client.parser import text_string_to_metric_families

from tests.integration import waits
from tests.integration.fleet_helpers import preload, until

pytestmark = pytest.mark.integration

MODEL = "llama3.2"
KEY = parse_name(MODEL).key
COLD = "all-minilm"  # on every simulator's disk, loaded nowhere
HOLD = (10**6, 10**6)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    families, samples = set(), {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return families, samples


def pick(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of ``name`` whose labels include ``labels``."""
    return {lab: v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab)}


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(pick(samples, name, **labels).values())


async def scrape(s: aiohttp.ClientSession, url: str) -> tuple[set[str], Samples]:
    async with s.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/plain")
        return parse(await r.text())


def fleet_part(samples: Samples) -> Samples:
    return {k: v for k, v in samples.items() if k[0].startswith("corral_fleet_")}


@pytest.fixture
async def fleet(nats_server: NatsServer, root: str) -> Any:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(2, time_scale=0.02, num_parallel=1, reply_tokens=HOLD),  # num_predict ends a reply
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={"queue_timeout_s": 20.0},
        registry={"replica_check_s": 0.0},
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


async def test_metrics_and_route_headers_after_traffic(
    fleet: LocalFleet, nats_server: NatsServer, root: str
) -> None:
    gw = fleet.gateway
    assert gw is not None and gw.nc is not None
    sent: list[dict[str, Any]] = []  # each answered request: model key, agent, route, tokens

    async with aiohttp.ClientSession() as s:

        async def call(
            path: str, body: dict[str, Any], model: str, headers: dict[str, str] | None = None
        ) -> Any:
            body = body | {"options": {"num_predict": 3}}
            async with s.post(fleet.url + path, json=body, headers=headers or {}) as r:
                assert r.status == 200, await r.text()
                text = await r.text()
            last = json.loads(text.strip().splitlines()[-1])
            sent.append(
                {
                    "model": model,
                    "agent": r.headers["x-corral-agent"],
                    "route": r.headers["x-corral-route"],
                    "prompt": last.get("prompt_eval_count", 0),
                    "generated": last.get("eval_count", 0),
                    "stream": body.get("stream", path != "/api/embed"),  # embed never streams
                    "queue_ms": r.headers.get("x-corral-queue-ms"),
                }
            )
            return last

        opening = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        await call("/api/generate", {"model": MODEL, "prompt": "a", "stream": False}, KEY)
        first = await call("/api/chat", {"model": MODEL, "messages": opening}, KEY)  # streamed
        # the follow-up goes back to the conversation's agent once its state shows the slot free again
        await until(fleet, lambda: all(a.in_flight == 0 for a in gw.fleet.agents()))
        follow = [*opening, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
        await call("/api/chat", {"model": MODEL, "messages": follow, "stream": False}, KEY)
        await call("/api/generate", {"model": MODEL, "prompt": "b"}, KEY)  # streamed
        await call("/api/embed", {"model": COLD, "input": "x"}, parse_name(COLD).key)
        rr = {"x-load-balancing-strategy": "round_robin"}
        await call("/api/generate", {"model": MODEL, "prompt": "c", "stream": False}, KEY, rr)
        assert first["done"]
        assert [r["route"] for r in sent] == ["warm", "warm", "session", "warm", "load", "round_robin"]
        assert sent[2]["agent"] == sent[1]["agent"]  # the follow-up went to the conversation's agent
        assert all(r["queue_ms"] is None for r in sent)

        families, samples = await scrape(s, fleet.url)
        for name in (
            "corral_gateway_requests",
            "corral_gateway_time_to_first_token_seconds",
            "corral_gateway_request_duration_seconds",
            "corral_gateway_prompt_tokens",
            "corral_gateway_generated_tokens",
            "corral_gateway_queue_wait_seconds",
            "corral_gateway_routing_decisions",
            "corral_gateway_claim_retries",
            "corral_gateway_failovers",
            "corral_gateway_nats_connected",
            "corral_fleet_agents",
            "corral_fleet_gpu_vram_total_bytes",
            "corral_fleet_gpu_vram_used_bytes",
            "corral_fleet_slots",
            "corral_fleet_agent_in_flight",
            "corral_fleet_agent_free_slots",
            "corral_fleet_queue_depth",
        ):
            assert name in families, name
        assert total(samples, "corral_gateway_requests_total") == len(sent)
        for r in sent:
            n = sum(1 for x in sent if x["model"] == r["model"] and x["agent"] == r["agent"])
            got = total(
                samples, "corral_gateway_requests_total", model=r["model"], agent=r["agent"], status="200"
            )
            assert got == n
            prompt = sum(x["prompt"] for x in sent if x["model"] == r["model"] and x["agent"] == r["agent"])
            generated = sum(
                x["generated"] for x in sent if x["model"] == r["model"] and x["agent"] == r["agent"]
            )
            labels = {"model": r["model"], "agent": r["agent"]}
            assert total(samples, "corral_gateway_prompt_tokens_total", **labels) == prompt
            assert total(samples, "corral_gateway_generated_tokens_total", **labels) == generated
        streamed = sum(1 for r in sent if r["stream"])
        assert total(samples, "corral_gateway_time_to_first_token_seconds_count") == streamed == 2
        assert total(samples, "corral_gateway_request_duration_seconds_count") == len(sent)
        decisions = pick(samples, "corral_gateway_routing_decisions_total")
        assert decisions == {
            (("reason", "warm"), ("strategy", "auto")): 3,
            (("reason", "session"), ("strategy", "auto")): 1,
            (("reason", "load"), ("strategy", "auto")): 1,
            (("reason", "round_robin"), ("strategy", "round_robin")): 1,
        }
        assert total(samples, "corral_gateway_nats_connected") == 1
        # the fleet as the agents' states say
        states = gw.fleet.agents()
        assert total(samples, "corral_fleet_agents", status="active") == len(states) == 2
        for a in states:
            for g in a.gpus:
                lab = {"agent": a.id, "gpu": str(g.index)}
                assert total(samples, "corral_fleet_gpu_vram_total_bytes", **lab) == g.vram_total
                assert total(samples, "corral_fleet_gpu_vram_used_bytes", **lab) == g.vram_total - g.vram_free
            assert total(samples, "corral_fleet_slots", agent=a.id, model=KEY) == a.parallel == 1

        # a second gateway reports the same fleet (its own requests: none)
        second = Gateway(GatewaySettings(nats_url=nats_server.url, root=root, port=0))
        await second.start()
        try:
            scraped: dict[str, Samples] = {}

            async def same_fleet() -> bool:
                scraped["ours"] = fleet_part((await scrape(s, fleet.url))[1])
                scraped["theirs"] = fleet_part(
                    parse((await second.planner.metrics.scrape(second.nc, second.subjects)).decode())[1]
                )  # type: ignore[union-attr]
                return scraped["ours"] == scraped["theirs"]

            # both watches caught up with the same heartbeat: checked on each change the first gateway
            # hears, and at least every second, for the second gateway may hear it a moment later
            await waits.until(
                same_fleet,
                lambda left: gw.fleet.wait_changed(min(left, 1.0)),
                timeout=20.0,
                what="both gateways report the same fleet",
                state=lambda: scraped,
            )
            _, own = parse((await second.planner.metrics.scrape(second.nc, second.subjects)).decode())  # type: ignore[union-attr]
            assert total(own, "corral_gateway_requests_total") == 0
        finally:
            await second.stop()

        # a queued request: both slots held, one more waits in the fleet queue
        nudges = await gw.nc.subscribe(f"{root}.queued.>")
        holds = [
            await s.post(
                fleet.url + "/api/generate",
                json={"model": MODEL, "prompt": f"hold{i}", "options": {"num_predict": 10**6}},
            )
            for i in range(2)
        ]
        assert sorted(h.headers["x-corral-agent"] for h in holds) == sorted(a.id for a in fleet.agents)
        queued = asyncio.create_task(
            s.post(
                fleet.url + "/api/generate",
                json={"model": MODEL, "prompt": "q", "stream": False, "options": {"num_predict": 3}},
            )
        )
        await nudges.next_msg(timeout=10)
        await until(fleet, lambda: sum(a.in_flight for a in gw.fleet.agents()) == 2)  # states published
        _, samples = await scrape(s, fleet.url)
        assert total(samples, "corral_fleet_queue_depth", model=KEY) == 1
        assert total(samples, "corral_fleet_agent_in_flight") == 2
        holds[0].close()
        r = await asyncio.wait_for(queued, 20)
        assert r.status == 200
        assert r.headers["x-corral-route"] == "queued"
        assert int(r.headers["x-corral-queue-ms"]) > 0  # it waited while the other slot was held
        await r.read()
        holds[1].close()
        _, samples = await scrape(s, fleet.url)
        assert total(samples, "corral_gateway_queue_wait_seconds_count", model=KEY) == 1
        assert total(samples, "corral_gateway_routing_decisions_total", reason="queued") == 1

        # label values stay bounded: 50 unknown models are one label value
        for _ in range(50):
            body = {"model": "nope-" + secrets.token_hex(4), "prompt": "x", "stream": False}
            async with s.post(fleet.url + "/api/generate", json=body) as r404:
                assert r404.status == 404
                assert "x-corral-agent" not in r404.headers
        _, samples = await scrape(s, fleet.url)
        models = {dict(lab)["model"] for lab in pick(samples, "corral_gateway_requests_total")}
        assert models == {KEY, parse_name(COLD).key, "other"}
        assert (
            total(samples, "corral_gateway_requests_total", model="other", status="404", agent="none") == 50
        )


async def test_agent_and_aggregator_serve_their_own_metrics(fleet: LocalFleet) -> None:
    assert fleet.aggregator is not None
    agents = list(fleet.agents)
    agent_server = await serve_metrics(registry_for(lambda: agents), 0, "127.0.0.1")
    agg_server = await serve_metrics(fleet.aggregator.metrics.registry, 0, "127.0.0.1")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                fleet.url + "/api/generate",
                json={"model": MODEL, "prompt": "a", "stream": False, "options": {"num_predict": 3}},
            ) as r:
                assert r.status == 200
                served = r.headers["x-corral-agent"]
                reply = await r.json()
            # a cold model loads: the agent that loads it counts the load once it re-reads /api/ps
            async with s.post(fleet.url + "/api/embed", json={"model": COLD, "input": "x"}) as r:
                assert r.status == 200
                loader = r.headers["x-corral-agent"]
            agent = next(a for a in agents if a.id == loader)
            cold = parse_name(COLD).key
            await until(fleet, lambda: any(k == cold for k, _ in agent.loads.loads))
            port = agent_server.sockets[0].getsockname()[1]
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200
                families, samples = parse(await r.text())
            assert {
                "corral_agent_slots_busy",
                "corral_agent_slots_free",
                "corral_agent_model_loads",
            } <= families
            assert (
                total(samples, "corral_agent_model_loads_total", agent=loader, model=cold, reason="request")
                == 1
            )
            for a in agents:
                assert total(samples, "corral_agent_slots_free", agent=a.id, model=KEY) == 1
            async with s.get(f"http://127.0.0.1:{port}/other") as r:
                assert r.status == 404

            port = agg_server.sockets[0].getsockname()[1]
            want = reply["eval_count"]

            async def aggregated() -> Samples:
                async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                    assert r.status == 200
                    return parse(await r.text())[1]

            # The request's event reaches the aggregator on its own subscription; it then writes its
            # rolling rates, which count the request, to the views bucket: each write wakes the check.
            samples: Samples = {}

            async def counted() -> bool:
                nonlocal samples
                samples = await aggregated()
                return total(samples, "corral_aggregator_requests_total", model=KEY) >= 1

            assert fleet.gateway is not None and fleet.gateway.nc is not None
            kv = await fleet.gateway.nc.jetstream().key_value(fleet.gateway.subjects.views_bucket)
            rates = await kv.watch(views.RATES_KEY)
            try:
                await waits.until(
                    counted,
                    lambda left: rates.updates(timeout=left),
                    timeout=10.0,
                    what="the aggregator counts the request",
                )
            finally:
                await rates.stop()  # type: ignore[no-untyped-call]
            assert (
                total(samples, "corral_aggregator_requests_total", model=KEY, agent=served, status="200") >= 1
            )
            assert total(samples, "corral_aggregator_generated_tokens_total", model=KEY, agent=served) >= want
    finally:
        agent_server.close()
        agg_server.close()


async def _streaming(s: aiohttp.ClientSession, url: str) -> tuple[aiohttp.ClientResponse, str]:
    """A streamed generate that goes on (the replies here are endless), its first line read; and
    the agent that serves it."""
    r = await s.post(url + "/api/generate", json={"model": MODEL, "prompt": "on and on"})
    assert r.status == 200
    await r.content.readline()
    return r, r.headers["x-corral-agent"]


async def _counted(fleet: LocalFleet, s: aiohttp.ClientSession, **labels: str) -> None:
    """Until this gateway's requests counter has one request of ``labels`` (woken by fleet changes:
    the agent publishes its slot freed as the request ends)."""
    assert fleet.gateway is not None

    async def seen() -> bool:
        return total((await scrape(s, fleet.url))[1], "corral_gateway_requests_total", **labels) == 1

    await waits.until(seen, fleet.gateway.fleet.wait_changed, timeout=10.0)


async def test_a_stream_whose_client_left_counts_499_not_200(fleet: LocalFleet) -> None:
    async with aiohttp.ClientSession() as s:
        r, agent = await _streaming(s, fleet.url)
        r.close()  # the client goes away mid-answer
        await _counted(fleet, s, model=KEY, status="499", agent=agent)
        assert total((await scrape(s, fleet.url))[1], "corral_gateway_requests_total", status="200") == 0


async def test_a_stream_its_ollama_cut_counts_that_error_not_200(fleet: LocalFleet) -> None:
    async with aiohttp.ClientSession() as s:
        r, agent = await _streaming(s, fleet.url)
        sim = next(sim for a, sim in zip(fleet.agents, fleet.sims, strict=True) if a.id == agent)
        await sim.stop()  # its Ollama dies mid-answer: the stream ends with an error line
        last = [line async for line in r.content][-1]
        assert "error" in json.loads(last)
        assert fleet.gateway is not None

        async def statuses() -> list[str]:
            samples = (await scrape(s, fleet.url))[1]
            cut = pick(samples, "corral_gateway_requests_total", model=KEY, agent=agent)
            return [dict(lab)["status"] for lab, v in cut.items() if v]

        async def counted() -> bool:
            return bool(await statuses())

        await waits.until(counted, fleet.gateway.fleet.wait_changed, timeout=10.0)
        assert await statuses() in (["502"], ["503"]), await statuses()


def dashboard_series() -> dict[str, set[str]]:
    """Each series the Grafana dashboard queries → the labels its queries group or match by."""
    board = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/corral.json").read_text())
    exprs: list[str] = []

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            exprs.extend([o["expr"]] if isinstance(o.get("expr"), str) else [])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(board)
    out: dict[str, set[str]] = {}
    for expr in exprs:
        grouped = {g.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for g in by.split(",")} - {"le"}
        for name, matchers in re.findall(r"(corral_\w+)(\{[^}]*\})?", expr):
            out.setdefault(name, set()).update(grouped, re.findall(r"(\w+)\s*!?=~?", matchers))
    return out


async def test_the_grafana_dashboard_queries_series_that_exist(fleet: LocalFleet) -> None:
    """Every series `deploy/grafana/corral.json` queries is served, by the gateway (its own and the
    fleet's) or by an agent, and carries every label the queries group or match by: a renamed
    series or label would leave a panel empty without an error anywhere."""
    agents = list(fleet.agents)
    agent_server = await serve_metrics(registry_for(lambda: agents), 0, "127.0.0.1")
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "a", "options": {"num_predict": 3}}
            async with s.post(fleet.url + "/api/generate", json=body) as r:
                assert r.status == 200
                await r.read()
            async with s.post(fleet.url + "/api/embed", json={"model": COLD, "input": "x"}) as r:
                assert r.status == 200
            await until(fleet, lambda: any(a.loads.loads for a in agents))
            families, samples = await scrape(s, fleet.url)
            port = agent_server.sockets[0].getsockname()[1]
            agent_families, agent_samples = await scrape(s, f"http://127.0.0.1:{port}")
    finally:
        agent_server.close()
        await agent_server.wait_closed()
    families |= agent_families
    samples |= agent_samples
    wanted = dashboard_series()
    assert len(wanted) >= 15, wanted  # the dashboard was read
    for name, labels in sorted(wanted.items()):
        family = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert family in families, f"the dashboard queries {name}, which nothing serves"
        seen = [dict(lab) for (n, lab) in samples if n == name]
        for lab in seen:  # a series with no sample yet (no failover so far) shows only its family
            assert labels <= lab.keys(), (
                f"{name} has labels {sorted(lab)}, the dashboard uses {sorted(labels)}"
            )
    with_samples = {n for n in wanted if any(k[0] == n for k in samples)}
    assert {
        "corral_gateway_requests_total",
        "corral_fleet_slots",
        "corral_agent_model_loads_total",
    } <= with_samples
