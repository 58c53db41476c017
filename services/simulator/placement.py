"""Memory arithmetic of Ollama's scheduler: runner options, size estimate, fit rule.

Pure functions, unit-tested without an event loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from corral.protocol.runners import loaded_size
from corral.simulator.catalog import LocalModel
from corral.simulator.config import GIB


class RunnerOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Load-time options: a difference in any of these forces a reload."""

    num_ctx: int
    num_batch: int = 512
    num_gpu: int = -1
    main_gpu: int = 0
    use_mmap: bool | None = None
    num_thread: int = 0
    draft_num_predict: int = 0


def needs_reload(current: RunnerOptions, requested: RunnerOptions) -> bool:
    if requested.num_gpu != -1 and requested.num_gpu != current.num_gpu:
        return True
    return (
        current.num_ctx != requested.num_ctx
        or current.num_batch != requested.num_batch
        or current.main_gpu != requested.main_gpu
        or current.use_mmap != requested.use_mmap
        or current.num_thread != requested.num_thread
        or current.draft_num_predict != requested.draft_num_predict
    )


def estimate(model: LocalModel, opts: RunnerOptions, num_parallel: int) -> int:
    """Weights + f16 KV cache for num_ctx × num_parallel + a batch surcharge."""
    batch = 2 * GIB if opts.num_batch >= 2048 else 768 * (1 << 20) if opts.num_batch >= 1024 else 0
    return loaded_size(model.config.size, model.config.kv_bytes(opts.num_ctx, num_parallel), batch)


class Placement(msgspec.Struct, frozen=True):
    per_gpu: dict[int, int]  # GPU index → bytes in its VRAM
    size: int  # total (VRAM + system RAM)

    @property
    def size_vram(self) -> int:
        return sum(self.per_gpu.values())


def fit(
    need: int,
    free: Sequence[int],
    *,
    others_loaded: bool,
    ram_free: int,
    num_gpu: int = -1,
    layers: int = 32,
) -> Placement | None:
    """Where a model of `need` bytes goes, or None if it must wait for an eviction.

    With other models loaded it must fit entirely in VRAM within 80 % of free memory; alone it
    may spill to system RAM (partial offload, size_vram < size). `num_gpu=0` forces CPU.
    """
    if num_gpu == 0 or not free:
        return Placement({}, need) if need <= ram_free else None
    threshold = 0.8 if others_loaded else 1.0
    best = max(range(len(free)), key=lambda i: free[i])
    if need <= free[best] * threshold and num_gpu < 0:
        return Placement({best: need}, need)
    total_free = sum(free)
    if need <= total_free * threshold and num_gpu < 0:
        alloc: dict[int, int] = {}
        left = need
        for i in sorted(range(len(free)), key=lambda i: -free[i]):
            take = min(left, int(free[i] * threshold))
            if take > 0:
                alloc[i] = take
                left -= take
        if left <= 0:
            return Placement(alloc, need)
    if others_loaded:
        return None
    # Alone: offload as many layers as fit (or as num_gpu asks), the rest stays in RAM.
    per_layer = need / (layers + 1)
    on_gpu = min(layers + 1, int(total_free // per_layer) if per_layer > 0 else 0)
    if num_gpu > 0:
        on_gpu = min(on_gpu, num_gpu)
    vram = int(on_gpu * per_layer)
    if need - vram > ram_free:
        return None
    alloc = {}
    left = vram
    for i in sorted(range(len(free)), key=lambda i: -free[i]):
        take = min(left, free[i])
        if take > 0:
            alloc[i] = take
            left -= take
    return Placement(alloc, need)
