"""What Ollama does with a runner: its context length and the memory it takes, as pure rules
shared by routers, agents and the simulator."""

from __future__ import annotations


def effective_ctx(asked: int, trained: int) -> int:
    """The num_ctx Ollama gives a runner asked for ``asked``: capped at the model's trained context
    (0 = unknown: no cap)."""
    return min(asked, trained) if asked and trained else asked


F16_BYTES = 2  # bytes per KV-cache element at Ollama's default OLLAMA_KV_CACHE_TYPE (f16)


def kv_cache_bytes(
    layers: int, kv_heads: int, head_dim: int, num_ctx: int, num_parallel: int, elem_bytes: float = F16_BYTES
) -> int:
    """The KV cache Ollama allocates for a runner: K and V, per layer, per KV head, for
    ``num_ctx`` tokens in each of ``num_parallel`` slots (``q8_0`` is 1 byte an element, ``q4_0``
    half a byte; see https://github.com/ollama/ollama/blob/main/docs/faq.md)."""
    return int(2 * layers * kv_heads * head_dim * num_ctx * num_parallel * elem_bytes)


def loaded_size(weights: int, kv: int, graph: int = 0) -> int:
    """What a runner takes in (V)RAM, as Ollama's scheduler estimates it before a load: the
    weights (the model file), its KV cache and the compute graph."""
    return weights + kv + graph


def spilled_share(size: int, size_vram: int, *, on_gpu: bool) -> float:
    """The share of a loaded runner (``/api/ps``'s ``size`` and ``size_vram``) that spilled into
    system RAM, where it decodes several times slower; 0 for one wholly in VRAM, and for one wholly
    out of it or on a CPU backend (an Ollama running on its CPU, every model alike: no faster runner
    there to prefer)."""
    return 1.0 - size_vram / size if on_gpu and 0 < size_vram < size else 0.0
