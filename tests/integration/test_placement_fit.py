"""Placement end to end: a cold burst beside steady traffic on another model.

Two simulated Ollamas behind one gateway and registry. Agent A serves a busy model and has the cold
model on disk; its free VRAM holds the cold model's file but not the runner Ollama would load
(weights + KV cache for its context × A's parallel slots). Agent B, busy with a small model of its
own (more requests per slot than A, so a rule that looks at the file alone prefers A), has room
for the whole runner. The burst must load the cold model once, on B: nothing evicted on A, nothing
partially offloaded anywhere, every request answered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
from corral.protocol.names import parse_name
from corral.protocol.runners import loaded_size
from corral.runtime.natsserver import NatsServer
from corral.simulator.config import GB, GIB, ModelConfig, SimConfig, load_config
from corral.up import FleetOptions, LocalFleet

from tests.integration.fleet_helpers import until

CTX = 8192
BUSY = ModelConfig(name="llama3.2:latest", size_gb=2.019, context_length=131072, block_count=28)
COLD = ModelConfig(name="qwen3:8b", size_gb=5.225, family="qwen3", context_length=40960, block_count=36)
SMALL = ModelConfig(name="llama3.2:1b", size_gb=1.321, context_length=131072, block_count=16)
A_PARALLEL, B_PARALLEL = 4, 1
A_VRAM_GB, B_VRAM_GB = 14, 24
BURST = 12
STEADY_A, STEADY_B = 3, 2  # clients streaming without pause on A's and B's own model


def _sim(vram_gb: float, parallel: int, models: list[ModelConfig], seed: int, **kw: Any) -> SimConfig:
    return load_config(
        None,
        vendor="nvidia",
        gpus=[{"name": f"{vram_gb} GB card", "vram_gb": vram_gb}],
        num_parallel=parallel,
        context_length=CTX,
        time_scale=0.1,
        seed=seed,
        models=[msgspec.to_builtins(m) for m in models],
        **kw,
    )


def _options(server: NatsServer, root: str, sims: list[SimConfig], **gateway: Any) -> FleetOptions:
    """Agents that read their Ollama often, and no replica checks of the registry's own."""
    return FleetOptions(
        port=0,
        nats_url=server.url,
        root=root,
        sims=sims,
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway=gateway,
        registry={"replica_check_s": 0.0},
    )


def _runner_size(m: ModelConfig, parallel: int) -> int:
    return loaded_size(m.size, m.kv_bytes(CTX, parallel))


def test_the_premise_file_fits_on_a_but_the_runner_does_not() -> None:
    """The fleet below is built so that only the loaded size tells A from B."""
    a_free = A_VRAM_GB * GIB - _runner_size(BUSY, A_PARALLEL)
    assert COLD.size <= 0.8 * a_free  # the file alone would fit beside the busy model
    assert _runner_size(COLD, A_PARALLEL) > 0.8 * a_free  # the runner does not
    b_free = B_VRAM_GB * GIB - _runner_size(SMALL, B_PARALLEL)
    assert _runner_size(COLD, B_PARALLEL) <= 0.8 * b_free  # B takes it whole, beside its own model
    assert _runner_size(COLD, A_PARALLEL) > 10 * GB > _runner_size(COLD, B_PARALLEL)


async def _steady(
    s: aiohttp.ClientSession, url: str, model: str, stop: asyncio.Event, statuses: list[int]
) -> None:
    body = {"model": model, "prompt": "steady", "stream": True}
    while not stop.is_set():
        async with s.post(url + "/api/generate", json=body) as r:
            async for _ in r.content:
                pass
            statuses.append(r.status)


async def _ps(s: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with s.get(url + "/api/ps") as r:
        assert r.status == 200
        models: list[dict[str, Any]] = (await r.json())["models"]
        return models


async def test_cold_burst_beside_steady_traffic_loads_whole_where_nothing_busy_is_evicted(
    nats_server: NatsServer, root: str
) -> None:
    sims = [
        _sim(A_VRAM_GB, A_PARALLEL, [BUSY, COLD], 0, reply_tokens=(150, 250)),
        _sim(B_VRAM_GB, B_PARALLEL, [SMALL, COLD], 1, reply_tokens=(30, 60)),
    ]
    opts = _options(nats_server, root, sims, queue_timeout_s=30.0)
    busy, cold, small = (parse_name(m.name).key for m in (BUSY, COLD, SMALL))
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        sim_a, sim_b = fleet.sims
        a_id, b_id = (a.id for a in fleet.agents)
        gw = fleet.gateway
        assert gw is not None
        stop, steady_statuses = asyncio.Event(), list[int]()
        steady = [
            asyncio.create_task(_steady(s, fleet.url, BUSY.name, stop, steady_statuses))
            for _ in range(STEADY_A)
        ] + [
            asyncio.create_task(_steady(s, fleet.url, SMALL.name, stop, steady_statuses))
            for _ in range(STEADY_B)
        ]
        try:

            def steady_seen() -> bool:
                a, b = gw.fleet.get(a_id), gw.fleet.get(b_id)
                return (
                    a is not None
                    and b is not None
                    and busy in a.busy_models
                    and small in b.busy_models
                    and gw.fleet.is_loaded(a_id, busy)
                    and gw.fleet.is_loaded(b_id, small)
                )

            await until(fleet, steady_seen, timeout=20.0)
            assert [sim_a.stats.loads, sim_b.stats.loads] == [1, 1]

            async def one() -> int:
                body = {"model": COLD.name, "prompt": "burst", "stream": False}
                async with s.post(fleet.url + "/api/generate", json=body) as r:
                    await r.read()
                    return r.status

            async with asyncio.timeout(60):
                statuses = await asyncio.gather(*(one() for _ in range(BURST)))
            assert statuses == [200] * BURST
            # while the steady clients still run: what is loaded, and how
            runners = {url: await _ps(s, url) for url in (sim_a.url, sim_b.url)}
        finally:
            stop.set()
            async with asyncio.timeout(30):
                await asyncio.gather(*steady)

        assert steady_statuses and set(steady_statuses) == {200}
        assert sim_a.stats.model(cold).loads == 0  # never tried on A
        assert sim_b.stats.model(cold).loads == 1  # one load, on B, for the whole burst
        assert sim_b.stats.model(cold).finished == BURST
        assert [sim_a.stats.evictions, sim_b.stats.evictions] == [0, 0]
        assert [sim_a.stats.unloads, sim_b.stats.unloads] == [0, 0]
        assert [sim_a.stats.model(busy).loads, sim_b.stats.model(small).loads] == [1, 1]
        assert sorted(m["name"] for m in runners[sim_a.url]) == [BUSY.name]
        assert sorted(m["name"] for m in runners[sim_b.url]) == sorted([SMALL.name, COLD.name])
        partial = [m["name"] for ms in runners.values() for m in ms if m["size_vram"] < m["size"]]
        assert partial == []


async def test_a_replica_partly_in_system_ram_gets_no_work_while_a_whole_one_has_free_slots(
    nats_server: NatsServer, root: str
) -> None:
    """A model loaded whole on a big card and, spilling into system RAM, on a small one: the small
    card's runner decodes several times slower, so requests go to the big card while it has a free
    slot (not to whichever agent NATS picks among the free slots' claims)."""
    model = ModelConfig(name="qwen3:8b", size_gb=12.0, family="qwen3", context_length=40960, block_count=36)
    sims = [_sim(48, 2, [model], 0, reply_tokens=(5, 10)), _sim(8, 2, [model], 1, reply_tokens=(5, 10))]
    opts = _options(nats_server, root, sims)
    key = parse_name(model.name).key
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        big, small = fleet.agents
        for sim in fleet.sims:  # loaded on each directly, to stay
            async with s.post(sim.url + "/api/generate", json={"model": model.name, "keep_alive": -1}) as r:
                assert r.status == 200
        spilled = [m for m in await _ps(s, fleet.sims[1].url) if m["name"] == model.name]
        assert spilled and 0 < spilled[0]["size_vram"] < spilled[0]["size"]  # the premise
        for a in fleet.agents:
            a._wake.refresh.set()
        gw = fleet.gateway
        assert gw is not None
        await until(fleet, lambda: len(gw.fleet.loaded_on(key)) == 2 and bool(small.runners.offloaded))
        served = []
        for i in range(12):  # one at a time: the big card always has a free slot
            body = {"model": model.name, "prompt": f"one {i}", "stream": False}
            async with s.post(fleet.url + "/api/generate", json=body) as r:
                assert r.status == 200
                served.append(r.headers["X-Corral-Agent"])
        assert served == [big.id] * 12, served
