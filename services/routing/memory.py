"""What a cold load takes in memory on an agent, and where Ollama's scheduler would put it.

Pure functions of fleet snapshots (`AgentState`), as Ollama's scheduler decides
(https://github.com/ollama/ollama/blob/main/server/sched.go):

- **Size.** A runner takes its weights (the model file) plus the KV cache for the context it gets
  × the agent's ``OLLAMA_NUM_PARALLEL`` slots plus the compute graph (`estimate_size`). Where a
  runner of the model at that context and parallelism is listed in some agent's /api/ps, its
  observed ``size`` is used instead (`observed_sizes`).
- **Fit.** With other models loaded, the model must fit entirely in VRAM within
  `FIT_SHARE_WITH_OTHERS` of the free memory of all the agent's GPUs together; alone on the GPUs it
  may load partially offloaded (the rest in system RAM, decoding much slower).
- **Eviction.** When it does not fit, or the agent's Ollama already holds as many models as it keeps
  at once (``OLLAMA_MAX_LOADED_MODELS``, by default three per GPU: `max_runners`), Ollama unloads
  loaded models one at a time, idle ones first, until it does (`plan_load`). A busy model's
  eviction waits for its requests to finish and then reloads elsewhere or later: the plan says so,
  and routers avoid it (`LoadPlan.thrashes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import msgspec
from corral.protocol.messages import AgentState, PsModel
from corral.protocol.names import key_of
from corral.protocol.runners import effective_ctx, kv_cache_bytes, loaded_size

__all__ = [
    "FIT_SHARE_WITH_OTHERS",
    "GRAPH_BYTES",
    "LoadPlan",
    "MAX_RUNNERS_PER_GPU",
    "estimate_size",
    "max_runners",
    "observed_sizes",
    "plan_load",
    "with_loads",
]

# Share of free VRAM a model may take when others stay loaded beside it (Ollama leaves headroom).
FIT_SHARE_WITH_OTHERS: Final = 0.8
# The compute graph Ollama reserves besides weights and KV cache at the default batch of 512 (it
# grows with the vocabulary and the batch; an observed runner's size replaces the estimate).
GRAPH_BYTES: Final = 256 * (1 << 20)
# Ollama's default OLLAMA_MAX_LOADED_MODELS is this many models per GPU.
MAX_RUNNERS_PER_GPU: Final = 3

# (model key, num_ctx, num_parallel) → the size Ollama reported for such a runner
ObservedSizes = Mapping[tuple[str, int, int], int]


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """How a load of ``size`` bytes lands on one agent."""

    size: int  # the estimated loaded size
    evicts: tuple[str, ...] = ()  # model keys unloaded first, in order
    busy_evicted: tuple[str, ...] = ()  # those of them with requests running
    offload: float = 0.0  # share of the model left in system RAM (0 = entirely in VRAM)

    @property
    def full(self) -> bool:
        """Entirely in VRAM."""
        return self.offload == 0.0

    @property
    def thrashes(self) -> bool:
        """The load evicts a model that has requests running or waiting there."""
        return bool(self.busy_evicted)


def observed_sizes(agents: Iterable[AgentState]) -> dict[tuple[str, int, int], int]:
    """Runners the agents list in /api/ps, by (model key, context, parallel): what Ollama really
    allocated for them. A runner whose context is not reported is left out."""
    seen: dict[tuple[str, int, int], int] = {}
    for a in agents:
        for m in a.loaded:
            key = key_of(m.name)
            if key is not None and m.context_length > 0 and m.size > 0:
                seen[(key, m.context_length, max(a.parallel, 1))] = m.size
    return seen


def estimate_size(key: str, ctx: int, weights: int, agent: AgentState, observed: ObservedSizes) -> int:
    """Bytes a runner of ``key`` at context ``ctx`` (0 = unknown) takes on ``agent``: as observed
    for such a runner anywhere, else weights + KV cache + graph from the model's published shape,
    else the weights alone (an agent that does not publish the shape)."""
    meta = agent.model_meta.get(key)
    if meta is not None:
        ctx = effective_ctx(ctx, meta.trained_ctx)
    parallel = max(agent.parallel, 1)
    seen = observed.get((key, ctx, parallel)) if ctx else None
    if seen is not None:
        return seen
    if meta is None or not (meta.layers and meta.kv_heads and meta.head_dim and ctx):
        return weights
    kv = kv_cache_bytes(meta.layers, meta.kv_heads, meta.head_dim, ctx, parallel)
    return loaded_size(weights, kv, GRAPH_BYTES)


def plan_load(key: str, size: int, agent: AgentState) -> LoadPlan:
    """Where Ollama's scheduler puts a cold load of ``key`` (``size`` bytes) on ``agent``.

    An agent that reports no GPUs is taken to fit anything (it says nothing to the contrary).
    """
    if not agent.gpus:
        return LoadPlan(size)
    free = sum(g.vram_free for g in agent.gpus)
    busy_keys = _busy_keys(agent)
    others = sorted(
        (m for m in agent.loaded if key_of(m.name) != key),
        # Ollama unloads idle runners first; among equals the biggest frees most
        key=lambda m: (key_of(m.name) in busy_keys, -m.size_vram, m.name),
    )
    limit = max_runners(agent)
    evicted: list[str] = []
    while others:
        if size <= free * FIT_SHARE_WITH_OTHERS and len(others) < limit:
            break
        victim = others.pop(0)
        free += victim.size_vram
        evicted.append(key_of(victim.name) or victim.name)
    busy = tuple(k for k in evicted if k in busy_keys)
    offload = 0.0 if others or size <= free else 1.0 - free / size
    return LoadPlan(size, tuple(evicted), busy, max(0.0, min(offload, 1.0)))


def max_runners(agent: AgentState) -> int:
    """How many models ``agent``'s Ollama keeps loaded at once, however much memory is free: its
    ``OLLAMA_MAX_LOADED_MODELS`` as the agent publishes it, else Ollama's default of three per GPU
    (a load beyond it unloads another model first)."""
    return agent.max_loaded if agent.max_loaded > 0 else MAX_RUNNERS_PER_GPU * max(len(agent.gpus), 1)


def _busy_keys(agent: AgentState) -> set[str]:
    """The models with requests on ``agent``: as it publishes them, or every loaded model when it
    has requests but does not say for which (an agent that predates ``busy_models``)."""
    if agent.busy_models or agent.in_flight + agent.queued == 0:
        return set(agent.busy_models)
    return {k for m in agent.loaded if (k := key_of(m.name)) is not None}


def with_loads(agent: AgentState, loads: Iterable[tuple[str, int, int]]) -> AgentState:
    """``agent`` as it will be once ``loads`` (model key, num_ctx or 0 for the default, loaded size)
    have begun there: each listed as a runner still loading for that context (Ollama lists one in
    /api/ps from the moment its load begins), its size taken from the GPU with the most free memory.
    For a placer that decides faster than agents publish what it sent them."""
    loaded, loading, gpus = list(agent.loaded), list(agent.loading), list(agent.gpus)
    loading_ctx = dict(agent.loading_ctx)
    for key, num_ctx, size in loads:
        if key in loading or any(key_of(m.name) == key for m in loaded):
            continue
        loaded.append(PsModel(name=key, model=key, size=size, digest="", expires_at="", size_vram=size))
        loading.append(key)
        loading_ctx[key] = num_ctx
        if gpus:
            i = max(range(len(gpus)), key=lambda j: gpus[j].vram_free)
            gpus[i] = msgspec.structs.replace(gpus[i], vram_free=max(0, gpus[i].vram_free - size))
    return msgspec.structs.replace(
        agent, loaded=tuple(loaded), loading=tuple(loading), loading_ctx=loading_ctx, gpus=tuple(gpus)
    )
