"""Constructed fleet states around one model for the cost model's unit tests: qwen2.5:14b, a 9 GB
file of 48 layers with 8 KV heads of 128, trained on 32k (at 32k its runner is about 15.7 GB by
Ollama's estimate)."""

from __future__ import annotations

from corral.protocol.messages import AgentState, Gpu, ModelMeta, PsModel, TagModel

GB = 1_000_000_000
GIB = 1 << 30
MODEL = "qwen2.5:14b"
QWEN = ModelMeta(layers=48, kv_heads=8, head_dim=128, trained_ctx=32768)


def ps(name: str, size: int, ctx: int = 0) -> PsModel:
    """A runner of ``name`` in /api/ps, wholly in VRAM (``ctx`` 0: its context not reported)."""
    return PsModel(
        name=name, model=name, size=size, digest=name, expires_at="", size_vram=size, context_length=ctx
    )


def agent(
    id: str,
    *,
    vram: int = 24 * GIB,
    loaded: tuple[PsModel, ...] = (),
    busy: tuple[str, ...] = (),
    in_flight: int = 0,
    parallel: int = 1,
    ctx: int = 32768,
    meta: bool = True,
    loading: bool = False,
    load_s: float = 0.0,
    max_loaded: int = 0,
) -> AgentState:
    """``MODEL`` on disk; ``loaded`` fill the GPU (free = vram - their size_vram); ``busy``: models
    with requests running; ``loading``: a load of ``MODEL`` under way; ``load_s``: its last load's
    time here; ``max_loaded``: its Ollama's OLLAMA_MAX_LOADED_MODELS (0: the default)."""
    free = vram - sum(m.size_vram for m in loaded)
    return AgentState(
        id=id,
        vendor="nvidia",
        host=id,
        ollama_url=f"http://{id}:11434",
        gpus=(Gpu(index=0, name="gpu", vendor="nvidia", vram_total=vram, vram_free=free),),
        models=(TagModel(name=MODEL, model=MODEL, modified_at="", size=9 * GB, digest="q"),),
        loaded=loaded,
        loading=(MODEL,) if loading else (),
        parallel=parallel,
        default_num_ctx=ctx,
        model_meta={MODEL: QWEN} if meta else {},
        busy_models=busy,
        in_flight=in_flight,
        load_s={MODEL: load_s} if load_s else {},
        max_loaded=max_loaded,
    )
