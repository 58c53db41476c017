"""Simulator settings: the machine (vendor, GPUs, speed), Ollama's scheduler knobs and the model list.

A `SimConfig` comes from three layers, later ones winning: built-in defaults (a bare `corral sim`
serves llama3.2, qwen3:8b and all-minilm on one 24 GB NVIDIA card), a TOML file, and CLI flags::

    vendor = "nvidia"        # nvidia | amd | intel | apple | cpu
    gpus = [{ name = "RTX 4090", vram_gb = 24 }]
    speed = 1.0
    num_parallel = 2
    time_scale = 1.0         # 0.01 = everything 100x faster; 0 = no delays at all
    [[models]]
    name = "llama3.2:3b"
    size_gb = 2.0
    capabilities = ["completion", "tools"]
    pulled = true            # false = available to pull
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
from corral.protocol.errors import InvalidModelName
from corral.protocol.names import parse_name
from corral.protocol.runners import kv_cache_bytes

Vendor = Literal["nvidia", "amd", "intel", "apple", "cpu"]

GB: Final = 1_000_000_000
GIB: Final = 1 << 30

#: Decode speed relative to an NVIDIA card of the same memory bandwidth class.
VENDOR_SPEED: Final[dict[str, float]] = {"nvidia": 1.0, "amd": 0.85, "intel": 0.55, "apple": 0.6, "cpu": 0.08}


class GpuConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One GPU; `vram_gb` is in GiB as cards are sold (a "24 GB" card has 24 GiB)."""

    name: str = "RTX 4090"
    vram_gb: float = 24.0


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One model the simulated box knows: on disk (`pulled`) or in the simulated registry."""

    name: str
    size_gb: float
    parameter_size: str = ""
    quantization: str = "Q4_K_M"
    family: str = "llama"
    capabilities: list[str] = msgspec.field(default_factory=lambda: ["completion"])
    pulled: bool = True
    context_length: int = 0  # trained context; 0 = derived from the family/size
    embedding_length: int = 0
    block_count: int = 0
    head_count_kv: int = 8
    head_dim: int = 128
    num_parallel: int = 0  # 0 = the server's num_parallel (embedding models always 1)

    @property
    def size(self) -> int:
        return int(self.size_gb * GB)

    @property
    def is_embedding(self) -> bool:
        return "embedding" in self.capabilities and "completion" not in self.capabilities

    @property
    def layers(self) -> int:
        if self.block_count:
            return self.block_count
        gb = self.size_gb
        return (
            6 if gb < 0.3 else 16 if gb < 1.5 else 28 if gb < 3 else 36 if gb < 7 else 48 if gb < 15 else 80
        )

    @property
    def trained_context(self) -> int:
        if self.context_length:
            return self.context_length
        return 512 if self.is_embedding else 131072

    @property
    def embedding_dim(self) -> int:
        if self.embedding_length:
            return self.embedding_length
        return 384 if self.size_gb < 0.2 else 768 if self.size_gb < 1 else 3072 if self.size_gb < 3 else 4096

    @property
    def parameter_count(self) -> int:
        p = self.parameter_size.strip().upper()
        try:
            if p.endswith("B"):
                return int(float(p[:-1]) * 1e9)
            if p.endswith("M"):
                return int(float(p[:-1]) * 1e6)
        except ValueError:
            pass
        return int(self.size_gb * 1.8e9)

    def kv_bytes(self, num_ctx: int, num_parallel: int) -> int:
        """f16 KV cache: 2 × layers × kv_heads × head_dim × (num_ctx × num_parallel) × 2 bytes."""
        return kv_cache_bytes(self.layers, self.head_count_kv, self.head_dim, num_ctx, num_parallel)


def _default_models() -> list[ModelConfig]:
    return [
        ModelConfig(
            name="llama3.2:latest",
            size_gb=2.019,
            parameter_size="3.2B",
            family="llama",
            capabilities=["completion", "tools"],
            context_length=131072,
            embedding_length=3072,
            block_count=28,
        ),
        ModelConfig(
            name="qwen3:8b",
            size_gb=5.225,
            parameter_size="8.2B",
            family="qwen3",
            capabilities=["completion", "tools", "thinking"],
            context_length=40960,
            embedding_length=4096,
            block_count=36,
        ),
        ModelConfig(
            name="all-minilm:latest",
            size_gb=0.046,
            parameter_size="23M",
            quantization="F16",
            family="bert",
            capabilities=["embedding"],
            context_length=512,
            embedding_length=384,
            block_count=6,
            head_count_kv=12,
            head_dim=32,
        ),
        ModelConfig(
            name="llama3.2:1b",
            size_gb=1.321,
            parameter_size="1.2B",
            family="llama",
            capabilities=["completion", "tools"],
            pulled=False,
            context_length=131072,
            embedding_length=2048,
            block_count=16,
        ),
        ModelConfig(
            name="gemma3:4b",
            size_gb=3.338,
            parameter_size="4.3B",
            family="gemma3",
            capabilities=["completion", "vision"],
            pulled=False,
            context_length=131072,
            embedding_length=2560,
            block_count=34,
            head_count_kv=4,
            head_dim=256,
        ),
        ModelConfig(
            name="mistral:latest",
            size_gb=4.372,
            parameter_size="7.2B",
            family="llama",
            capabilities=["completion", "tools"],
            pulled=False,
            context_length=32768,
            embedding_length=4096,
            block_count=32,
        ),
        ModelConfig(
            name="deepseek-r1:7b",
            size_gb=4.683,
            parameter_size="7.6B",
            family="qwen2",
            capabilities=["completion", "thinking"],
            pulled=False,
            context_length=131072,
            embedding_length=3584,
            block_count=28,
            head_count_kv=4,
        ),
        ModelConfig(
            name="nomic-embed-text:latest",
            size_gb=0.274,
            parameter_size="137M",
            quantization="F16",
            family="nomic-bert",
            capabilities=["embedding"],
            pulled=False,
            context_length=2048,
            embedding_length=768,
            block_count=12,
            head_count_kv=12,
            head_dim=64,
        ),
    ]


def _default_gpus() -> list[GpuConfig]:
    return [GpuConfig()]


class SimConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the simulator needs; built once and passed down.

    Many attributes, on purpose: each is one key of the simulator's TOML file (frozen, no logic)."""

    vendor: Vendor = "nvidia"
    gpus: list[GpuConfig] = msgspec.field(default_factory=_default_gpus)
    ram_gb: float = 64.0  # system memory available for partial offload
    speed: float = 1.0  # relative to the built-in rates
    num_parallel: int = 1  # Ollama's OLLAMA_NUM_PARALLEL (HEAD default 1)
    time_scale: float = 1.0  # multiplies every delay; 0 = no delays at all
    keep_alive: str = "5m"  # OLLAMA_KEEP_ALIVE (Go duration, or unitless seconds)
    max_loaded_models: int = 0  # 0 = 3 × number of GPUs
    max_queue: int = 512
    context_length: int = 0  # OLLAMA_CONTEXT_LENGTH; 0 = VRAM tier (4k / 32k / 256k)
    gpu_overhead_gb: float = 0.0
    load_bandwidth: float = 2.0e9  # bytes/s from disk to GPU
    load_overhead_s: float = 0.4
    vram_release_s: float = 0.5  # until a discrete GPU reports the memory free again
    pull_bandwidth: float = 200e6  # bytes/s from the simulated registry
    push_bandwidth: float = 50e6
    decode_rate: float = 320.0  # tokens/s × GB for one stream on an NVIDIA card (≈150 tok/s at 2 GB)
    prompt_factor: float = 50.0  # prompt tok/s = decode tok/s × this
    reply_tokens: tuple[int, int] = (20, 60)  # natural reply length range, before num_predict caps it
    version: str = "0.12.3"
    seed: int = 0
    models: list[ModelConfig] = msgspec.field(default_factory=_default_models)

    def load_seconds(self, size: int) -> float:
        """Seconds to load a model file of ``size`` bytes from disk into the GPU."""
        return (size / self.load_bandwidth + self.load_overhead_s) / self.speed

    def stream_rate(self, size_gb: float) -> float:
        """Decode tokens/s of one stream of a model of ``size_gb`` held wholly in VRAM (memory-bandwidth
        bound), scaled by vendor and `speed`."""
        base = min(self.decode_rate / max(size_gb, 0.05), 1500.0)
        return base * VENDOR_SPEED.get(self.vendor, 1.0) * self.speed

    @property
    def max_loaded(self) -> int:
        if self.max_loaded_models > 0:
            return self.max_loaded_models
        return 3 * max(1, len(self.gpus) if self.vendor != "cpu" else 1)

    @property
    def total_vram(self) -> int:
        if self.vendor == "cpu":
            return 0
        return sum(int(g.vram_gb * GIB) for g in self.gpus)

    @property
    def default_num_ctx(self) -> int:
        if self.context_length > 0:
            return self.context_length
        total = self.total_vram
        if total >= 47 * GIB:
            return 262144
        if total >= 23 * GIB:
            return 32768
        return 4096


class ConfigError(ValueError):
    """A settings file or flag that cannot be used."""


def load_config(path: str | Path | None = None, **overrides: Any) -> SimConfig:
    """Defaults ← TOML file ← keyword overrides (None values are ignored, as from unset flags).

    ``vram_gb=`` is a shorthand that sets the VRAM of every configured GPU.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
    vram = overrides.pop("vram_gb", None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = msgspec.convert(data, SimConfig, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid simulator config: {e}") from e
    if vram is not None:
        cfg = msgspec.structs.replace(
            cfg, gpus=[GpuConfig(name=g.name, vram_gb=float(vram)) for g in cfg.gpus]
        )
    validate(cfg)
    return cfg


def validate(cfg: SimConfig) -> None:
    if cfg.speed <= 0:
        raise ConfigError("speed must be > 0")
    if cfg.time_scale < 0:
        raise ConfigError("time_scale must be >= 0")
    if cfg.num_parallel < 1:
        raise ConfigError("num_parallel must be >= 1")
    if cfg.max_queue < 1:
        raise ConfigError("max_queue must be >= 1")
    if not 1 <= cfg.reply_tokens[0] <= cfg.reply_tokens[1]:
        raise ConfigError("reply_tokens must be [min, max] with 1 <= min <= max")
    if cfg.vendor != "cpu" and not cfg.gpus:
        raise ConfigError(f"vendor {cfg.vendor!r} needs at least one GPU")
    seen: set[str] = set()
    for m in cfg.models:
        try:
            key = parse_name(m.name).key
        except InvalidModelName as e:
            raise ConfigError(f"invalid model name {m.name!r}") from e
        if key in seen:
            raise ConfigError(f"model {m.name!r} is listed twice")
        seen.add(key)
        if m.size_gb <= 0:
            raise ConfigError(f"model {m.name!r}: size_gb must be > 0")
