"""The model shape the agent reads from /api/show, and the memory formula routers and the simulator share."""

from __future__ import annotations

import msgspec
from corral.agent.ollama import meta_of
from corral.protocol.messages import AgentState, ModelMeta, agent_state_decoder, agent_state_encoder
from corral.protocol.runners import kv_cache_bytes, loaded_size
from corral.simulator import ModelConfig, SimConfig
from corral.simulator.context import SimContext
from corral.simulator.manage import show_body
from corral.simulator.placement import RunnerOptions, estimate


def test_meta_from_model_info_prefers_key_length() -> None:
    info = {
        "general.architecture": "qwen2",
        "qwen2.block_count": 48,
        "qwen2.attention.head_count": 40,
        "qwen2.attention.head_count_kv": 8,
        "qwen2.attention.key_length": 128,
        "qwen2.embedding_length": 5120,
        "qwen2.context_length": 32768,
        "llama.block_count": 99,  # another architecture's key is not this model's
    }
    assert meta_of(info) == ModelMeta(layers=48, kv_heads=8, head_dim=128, trained_ctx=32768)


def test_meta_head_dim_from_embedding_and_heads_and_kv_heads_default_to_heads() -> None:
    info = {
        "general.architecture": "llama",
        "llama.block_count": 32,
        "llama.attention.head_count": 32,
        "llama.embedding_length": 4096,
    }
    assert meta_of(info) == ModelMeta(layers=32, kv_heads=32, head_dim=128)
    assert meta_of({}) == ModelMeta()


def test_kv_cache_formula() -> None:
    # qwen2.5:14b at 32k context, one slot, f16: 2 × 48 × 8 × 128 × 32768 × 2 bytes = 6 GiB
    assert kv_cache_bytes(48, 8, 128, 32768, 1) == 6 * 2**30
    assert kv_cache_bytes(48, 8, 128, 32768, 4) == 24 * 2**30
    assert kv_cache_bytes(48, 8, 128, 32768, 1, elem_bytes=1) == 3 * 2**30  # q8_0
    assert loaded_size(9_000_000_000, 10, 5) == 9_000_000_015


def test_simulator_show_carries_the_shape_its_memory_use_follows() -> None:
    cfg = SimConfig(
        models=[
            ModelConfig(name="wide:latest", size_gb=3.0, head_count_kv=4, head_dim=96, block_count=30),
            ModelConfig(name="gem:latest", size_gb=5.0, head_dim=256, context_length=8192),
        ]
    )
    ctx = SimContext.build(cfg)
    for name in ("wide", "gem"):
        model = ctx.catalog.get(name)
        assert model is not None
        meta = meta_of(show_body(model, verbose=False)["model_info"])
        c = model.config
        assert (meta.layers, meta.kv_heads, meta.head_dim) == (c.layers, c.head_count_kv, c.head_dim)
        assert meta.trained_ctx == c.trained_context
        kv = kv_cache_bytes(meta.layers, meta.kv_heads, meta.head_dim, 4096, 2)
        assert estimate(model, RunnerOptions(num_ctx=4096), 2) == loaded_size(c.size, kv)


def test_agent_state_without_meta_still_decodes_and_meta_round_trips() -> None:
    old = b'{"id":"a","vendor":"nvidia","host":"h","ollama_url":"u"}'
    state = agent_state_decoder.decode(old)
    assert state.model_meta == {} and state.busy_models == ()
    new = AgentState(
        id="a",
        vendor="nvidia",
        host="h",
        ollama_url="u",
        model_meta={"m:latest": ModelMeta(layers=2, kv_heads=1, head_dim=64)},
        busy_models=("m:latest",),
    )
    assert agent_state_decoder.decode(agent_state_encoder.encode(new)) == new
    assert b"trained_ctx" not in msgspec.json.encode(ModelMeta(layers=2))
