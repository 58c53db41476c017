"""The benchmark's fleet: six simulated GPU servers with one model catalogue, the settings scaled to
the simulated clock, a seeded router, and the waits until the gateway sees it all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import msgspec
from corral.agent.settings import AgentSettings
from corral.aggregator.settings import AggregatorSettings
from corral.gateway.settings import GatewaySettings
from corral.protocol.names import parse_name
from corral.registry.settings import RegistrySettings
from corral.routing import Router
from corral.runtime.settings import describe
from corral.simulator import SimConfig, load_config
from corral.up import FleetOptions, LocalFleet

from bench.common import fetch, post


class Machine(NamedTuple):
    vendor: str
    gpu: str
    vram_gb: float
    speed: float  # relative decode and load rate
    parallel: int  # OLLAMA_NUM_PARALLEL


MACHINES: tuple[Machine, ...] = (
    Machine("nvidia", "RTX 4090", 24, 1.0, 2),
    Machine("amd", "Radeon RX 7900 XTX", 24, 0.9, 2),
    Machine("nvidia", "RTX 4080", 16, 0.8, 2),
    Machine("amd", "Radeon PRO W7800", 32, 0.85, 4),
    Machine("nvidia", "RTX 3060", 12, 0.55, 1),
    Machine("nvidia", "RTX A6000", 48, 0.9, 4),
)
BIG_MODEL = "phi4:14b"
SMALL_CARD_GIB = 12  # cards this small do not have BIG_MODEL on disk
CONTEXT_LENGTH = 4096  # OLLAMA_CONTEXT_LENGTH on every simulated server

MODELS: tuple[dict[str, Any], ...] = (
    {"name": "llama3.2:1b", "size_gb": 1.321, "parameter_size": "1.2B", "block_count": 16},
    {"name": "llama3.2:3b", "size_gb": 2.019, "parameter_size": "3.2B", "block_count": 28},
    {
        "name": "gemma3:4b",
        "size_gb": 3.338,
        "parameter_size": "4.3B",
        "family": "gemma3",
        "block_count": 34,
        "head_count_kv": 4,
        "head_dim": 256,
    },
    {"name": "mistral:7b", "size_gb": 4.372, "parameter_size": "7.2B", "block_count": 32},
    {
        "name": "deepseek-r1:7b",
        "size_gb": 4.683,
        "parameter_size": "7.6B",
        "family": "qwen2",
        "capabilities": ["completion", "thinking"],
        "block_count": 28,
        "head_count_kv": 4,
    },
    {
        "name": "qwen3:8b",
        "size_gb": 5.225,
        "parameter_size": "8.2B",
        "family": "qwen3",
        "capabilities": ["completion", "tools", "thinking"],
        "block_count": 36,
    },
    {
        "name": BIG_MODEL,
        "size_gb": 9.053,
        "parameter_size": "14.7B",
        "family": "phi3",
        "context_length": 16384,
        "block_count": 40,
        "head_count_kv": 10,
    },
)

# -- settings on the simulated clock -----------------------------------------------------------------
# every settings class the fleet is built with, in the order `LocalFleet` starts its services
FLEET_SETTINGS: tuple[type[msgspec.Struct], ...] = (
    AgentSettings,
    RegistrySettings,
    GatewaySettings,
    AggregatorSettings,
)
MIN_PERIOD_S = 0.1


def scaled_periods(time_scale: float) -> dict[type[msgspec.Struct], dict[str, float]]:
    """Settings class → {field: default × time_scale} for every field declared a period
    (``setting(..., period=True)``) with a positive default; classes without one are left out."""
    out: dict[type[msgspec.Struct], dict[str, float]] = {}
    for cls in FLEET_SETTINGS:
        for s in describe(cls).values():
            if s.period and isinstance(s.default, int | float) and s.default > 0:
                out.setdefault(cls, {})[s.name] = max(float(s.default) * time_scale, MIN_PERIOD_S)
    return out


def fleet_sims(seed: int, time_scale: float, context_length: int = CONTEXT_LENGTH) -> list[SimConfig]:
    """One `SimConfig` per machine in `MACHINES`, each with ``OLLAMA_CONTEXT_LENGTH=context_length``."""
    out = []
    for m in MACHINES:
        models = [
            spec | {"pulled": not (spec["name"] == BIG_MODEL and m.vram_gb <= SMALL_CARD_GIB)}
            for spec in MODELS
        ]
        out.append(
            load_config(
                None,
                vendor=m.vendor,
                gpus=[{"name": m.gpu, "vram_gb": m.vram_gb}],
                speed=m.speed,
                num_parallel=m.parallel,
                time_scale=time_scale,
                context_length=context_length,
                keep_alive="5m",
                reply_tokens=(512, 768),  # longer than any num_predict of a workload: num_predict decides
                seed=seed,
                models=models,
            )
        )
    return out


def fleet_options(seed: int, time_scale: float, context_length: int = CONTEXT_LENGTH) -> FleetOptions:
    """A fresh fleet of `MACHINES` on the simulated clock, its gateway's `random` strategy seeded."""
    periods = scaled_periods(time_scale)
    return FleetOptions(
        port=0,
        sims=fleet_sims(seed, time_scale, context_length),
        log_level="WARNING",
        agent=dict(periods.get(AgentSettings, {})),
        registry=dict(periods.get(RegistrySettings, {})),
        gateway=dict(periods.get(GatewaySettings, {})),
        aggregator=dict(periods.get(AggregatorSettings, {})),
        router=Router(seed=seed),
    )


# -- a started fleet ----------------------------------------------------------------------------------
def address(url: str) -> tuple[str, int]:
    """``http://host:port`` → (host, port)."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"no host and port in {url!r}")
    return parts.hostname, parts.port


def agent_ids(fleet: LocalFleet) -> list[str]:
    """The id of the agent serving each simulator, in the order of ``fleet.sims``."""
    by_url = {a.settings.ollama_url: a.id for a in fleet.agents}
    return [by_url[sim.url] for sim in fleet.sims]


async def wait_ready(fleet: LocalFleet, n: int, timeout: float = 15.0) -> None:
    """Until the gateway's fleet view lists all ``n`` agents, each with its models on disk."""
    assert fleet.gateway is not None
    view = fleet.gateway.fleet
    deadline = time.monotonic() + timeout
    while True:
        agents = view.agents()
        if len(agents) >= n and all(a.models for a in agents):
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"the gateway lists {len(agents)} of {n} agents after {timeout:.0f}s")
        await view.wait_changed(min(left, 0.5))


async def load_directly(urls: Sequence[str], models: Sequence[str], timeout: float = 60.0) -> None:
    """Load ``models`` on every simulator at ``urls`` directly (Ollama's load-only request), past any
    router: the same starting state whichever router the workload then goes through."""

    async def load(url: str) -> None:
        host, port = address(url)
        for m in models:
            body = msgspec.json.encode({"model": m, "prompt": ""})
            status, reply = await fetch(host, port, post(host, port, "/api/generate", body), timeout)
            if status != 200:
                raise RuntimeError(f"loading {m} on {url}: HTTP {status} {reply[:200]!r}")

    await asyncio.gather(*(load(url) for url in urls))


async def prewarm(fleet: LocalFleet, models: Sequence[str], timeout: float = 60.0) -> None:
    """`load_directly` on every simulator of ``fleet``, then wait until the gateway's fleet view
    shows ``models`` loaded everywhere."""
    await load_directly([sim.url for sim in fleet.sims], models, timeout)
    keys = [parse_name(m).key for m in models]
    assert fleet.gateway is not None
    view = fleet.gateway.fleet
    deadline = time.monotonic() + timeout
    while not all(len(view.loaded_on(k)) == len(fleet.sims) for k in keys):
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"the gateway does not see {', '.join(models)} loaded everywhere")
        await view.wait_changed(min(left, 0.5))
