"""Rebalancing under a steady load, with simulated Ollamas: one model's requests wait on one card
while another model idles on two; the registry measures both and switches one card over, without
failing a request of either, and takes nothing from the model that keeps only one card."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import ollama
import pytest
from corral.protocol.names import parse_name
from corral.registry import rebalance
from corral.routing import Route, plan_move, warm
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import until

BUSY, IDLE = "qwen3:8b", "llama3.2"  # at four slots and the default context, a card holds one of them
BUSY_KEY, IDLE_KEY = parse_name(BUSY).key, parse_name(IDLE).key
CARD = {"vendor": "nvidia", "gpus": [{"name": "RTX 4090", "vram_gb": 24}], "num_parallel": 4}


def _options(nats_server: NatsServer, root: str, **registry: Any) -> FleetOptions:
    return FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(3, **CARD, reply_tokens=(24, 24)),
        agent={"refresh_s": 0.2, "heartbeat_s": 0.5},
        gateway={"queue_timeout_s": 60.0},
        # the replicas' fallback resync a minute away: only the rebalancing switches cards here
        registry={"replica_check_s": 60.0} | registry,
    )


async def _load(url: str, model: str) -> None:
    async with ollama.AsyncClient(host=url) as c:
        await c.generate(model=model, prompt="", keep_alive=-1)


async def _split(fleet: LocalFleet) -> None:
    """The split a first come, first served fleet can end in: the busy model on one card, the idle
    one on two, as the gateway and the registry both see it."""
    gw, registry = fleet.gateway, fleet.registry
    assert gw is not None and registry is not None
    await asyncio.gather(
        _load(fleet.sims[0].url, BUSY), _load(fleet.sims[1].url, IDLE), _load(fleet.sims[2].url, IDLE)
    )
    for a in fleet.agents:
        a._wake.refresh.set()
    for view in (gw.fleet, registry.fleet):
        await until(
            fleet,
            lambda v=view: len(v.loaded_on(BUSY_KEY)) == 1 and len(v.loaded_on(IDLE_KEY)) == 2,
            what="one card serving the busy model, two the idle one",
        )


async def _clients(fleet: LocalFleet, model: str, n: int, stop: asyncio.Event, failures: list[str]) -> int:
    """``n`` clients, each sending ``model`` requests one after the other until ``stop``; how many
    were answered (any other answer goes to ``failures``)."""
    done = 0

    async def client(s: aiohttp.ClientSession, i: int) -> None:
        nonlocal done
        while not stop.is_set():
            body = {"model": model, "prompt": f"c{i}", "stream": False, "options": {"num_predict": 24}}
            async with s.post(fleet.url + "/api/generate", json=body) as r:
                if r.status != 200:
                    failures.append(f"{model}: {r.status} {await r.text()}")
                    return
                await r.read()
                done += 1

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(s, i) for i in range(n)))
    return done


async def test_a_card_switches_from_an_idle_model_to_one_that_waits(
    nats_server: NatsServer, root: str
) -> None:
    async with LocalFleet(_options(nats_server, root, rebalance_s=2.0)) as fleet:
        gw, registry = fleet.gateway, fleet.registry
        assert gw is not None and registry is not None and registry.rebalancer is not None
        await _split(fleet)
        one_card = fleet.agents[0].id
        # a request's time observed (before, the gateway takes one for seconds, and a queue of them
        # for longer than a load: it would place the load itself)
        async with aiohttp.ClientSession() as s:
            body = {"model": BUSY, "prompt": "warm", "stream": False, "options": {"num_predict": 24}}
            for r in await asyncio.gather(
                *(s.post(fleet.url + "/api/generate", json=body) for _ in range(4))
            ):
                assert r.status == 200
                r.release()
        await until(fleet, lambda: BUSY_KEY in getattr(gw.fleet.get(one_card), "request_s", {}))
        stop, failures = asyncio.Event(), []
        busy = asyncio.create_task(_clients(fleet, BUSY, 10, stop, failures))  # 10 on 4 slots
        idle = asyncio.create_task(_clients(fleet, IDLE, 1, stop, failures))  # 1 on 8
        try:
            await until(
                fleet,
                lambda: len(gw.fleet.loaded_on(BUSY_KEY)) == 2,
                timeout=60,
                what="a second card serving the busy model",
            )
        finally:
            stop.set()
            answered = await busy + await idle
        assert failures == []
        assert answered > 0
        (move,) = registry.rebalancer.moves  # one switch, made by the rebalancing
        assert move.key == BUSY_KEY and move.evicts == (IDLE_KEY,) and move.agent != one_card
        switched = gw.fleet.get(move.agent)
        assert switched is not None and not warm(Route(key=IDLE_KEY), switched)
        assert len(gw.fleet.loaded_on(IDLE_KEY)) == 1  # the idle model keeps its other card
        # at the demand measured, nothing more is worth a switch: the idle model's last card stays
        assert plan_move(gw.fleet.agents(), registry.rebalancer.meter.demand()) is None  # type: ignore[union-attr]


async def test_no_switch_before_any_slot_time_is_reported(
    nats_server: NatsServer, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests wait for the model on one card while the other model idles on two, but no agent has
    reported slot time (as agents of an older version do not): the registry cannot tell what runs,
    so it switches nothing; once it reads what ran, the same demand switches a card."""
    async with LocalFleet(_options(nats_server, root, rebalance_s=3600.0)) as fleet:
        gw, registry = fleet.gateway, fleet.registry
        assert gw is not None and registry is not None and registry.rebalancer is not None
        rebalancer = registry.rebalancer
        assert rebalancer.meter is not None
        queued = {rebalancer.subjects.queue("any", parse_name(BUSY).token): 8}

        async def eight_waiting(*_: object) -> dict[str, int]:  # what the hours below had in the queue
            return queued

        monkeypatch.setattr(rebalance, "depths", eight_waiting)
        await _split(fleet)
        rebalancer._next_at = 0.0  # weighed at once, not an hour from now
        meter, now = rebalancer.meter, rebalancer.meter.since
        for t in range(1, 7200, 60):  # two hours of eight requests waiting, and nothing seen running
            meter.sample(now + t, {BUSY_KEY: 8})
        assert await rebalancer.step() is None and rebalancer.moves == []
        meter.ran(BUSY_KEY, 4 * 60.0)  # a minute of its four slots running
        meter.sample(meter.since + 7200 + 60, {BUSY_KEY: 8})
        move = await rebalancer.step()
        assert move is not None and move.key == BUSY_KEY and move.evicts == (IDLE_KEY,)


async def test_a_stream_counts_in_the_demand_while_it_runs(nats_server: NatsServer, root: str) -> None:
    """A stream a thousand tokens long: the registry's measure shows its slot in use while it
    runs (from the slot time its agent publishes), not only once it ends."""
    options = _options(nats_server, root, rebalance_s=2.0)
    options.sims = default_sims(1, **CARD, reply_tokens=(1000, 1000))  # some fifteen seconds
    async with LocalFleet(options) as fleet:
        registry = fleet.registry
        assert registry is not None and registry.rebalancer is not None
        last: dict[str, Any] = {}
        async with aiohttp.ClientSession() as s:
            body = {"model": BUSY, "prompt": "a long one"}
            async with s.post(fleet.url + "/api/generate", json=body) as r:
                assert r.status == 200
                async for line in r.content:  # read until the measure shows it, then hang up
                    last = json.loads(line)
                    shown = registry.rebalancer.demand().get(BUSY_KEY)
                    if shown is not None and shown.running > 0:
                        break
        assert shown is not None and shown.running > 0
        assert last.get("done") is False  # still streaming when it showed


async def test_no_switch_once_the_queue_is_empty(nats_server: NatsServer, root: str) -> None:
    """An hour of requests waiting for the busy model is in the measure, but the fleet queue is empty
    now (the burst is over, or a client has just unloaded the model with `keep_alive: 0`): no card
    is switched to it, so an unload is not undone by a load that serves nobody."""
    async with LocalFleet(_options(nats_server, root, rebalance_s=3600.0)) as fleet:
        registry = fleet.registry
        assert registry is not None and registry.rebalancer is not None
        rebalancer = registry.rebalancer
        assert rebalancer.meter is not None
        await _split(fleet)
        rebalancer._next_at = 0.0  # weighed at once, not an hour from now
        meter, now = rebalancer.meter, rebalancer.meter.since
        for t in range(1, 3600, 60):  # an hour of four slots running and eight requests waiting
            meter.ran(BUSY_KEY, 4 * 60.0)
            meter.sample(now + t, {BUSY_KEY: 8})
        assert meter.demand()[BUSY_KEY].waiting > 4
        assert await rebalancer.step() is None and rebalancer.moves == []
