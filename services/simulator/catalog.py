"""What is on the simulated disk (local models, blobs) and in the simulated registry (pullable models).

Lookups are case-insensitive through `parse_name(...).key`; a local model keeps the spelling it
was created with, as Ollama canonicalises to the stored case.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable

import msgspec
from corral.protocol.names import ModelName, parse_name
from corral.simulator.config import ModelConfig, SimConfig

_QUANT_BYTES = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 1.06, "Q6_K": 0.82, "Q5_K_M": 0.71}
_QUANT_DEFAULT = 0.6  # Q4_K_M and friends, bytes per parameter incl. overhead


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Layer(msgspec.Struct, frozen=True):
    media_type: str
    digest: str  # "sha256:<64 hex>"
    size: int


class LocalModel(msgspec.Struct, kw_only=True):
    name: ModelName
    config: ModelConfig
    modified_at: float
    system: str = ""
    template: str = "{{ .Prompt }}"
    license: str = ""
    parameters: dict[str, object] = msgspec.field(default_factory=dict)
    parent_model: str = ""

    @property
    def key(self) -> str:
        return self.name.key

    @property
    def display(self) -> str:
        return self.name.display

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def layers(self) -> list[Layer]:
        c = self.config
        base = f"{c.family}/{c.size_gb}/{c.quantization}/{c.parameter_size}"
        return [
            Layer("application/vnd.ollama.image.model", "sha256:" + sha256_hex("model:" + base), c.size),
            Layer(
                "application/vnd.ollama.image.template", "sha256:" + sha256_hex("tpl:" + self.template), 1_429
            ),
            Layer("application/vnd.ollama.image.license", "sha256:" + sha256_hex("lic:" + c.family), 7_711),
            Layer(
                "application/vnd.ollama.image.params",
                "sha256:" + sha256_hex("params:" + repr(sorted(self.parameters.items())) + self.system),
                96,
            ),
        ]

    @property
    def digest(self) -> str:
        """64 lowercase hex, no prefix: the manifest's sha256, as /api/tags shows it."""
        return sha256_hex("manifest:" + "".join(layer.digest for layer in self.layers))


class Catalog:
    """Local models, uploaded blobs and the registry's offer; owned by one `SimServer`."""

    def __init__(self, config: SimConfig, now: float | None = None) -> None:
        start = time.time() if now is None else now
        self.models: dict[str, LocalModel] = {}
        self.registry: dict[str, ModelConfig] = {}
        self.blobs: dict[str, bytes] = {}
        for i, m in enumerate(config.models):
            name = parse_name(m.name)
            self.registry[name.key] = m
            if m.pulled:
                # Deterministic, distinct modification times: earlier models look older.
                self.models[name.key] = LocalModel(name=name, config=m, modified_at=start - 3600.0 * (i + 1))

    def get(self, raw: str) -> LocalModel | None:
        """Raises `InvalidModelName` for a malformed name."""
        return self.models.get(parse_name(raw).key)

    def listing(self) -> list[LocalModel]:
        return sorted(self.models.values(), key=lambda m: m.modified_at, reverse=True)

    def add(self, name: ModelName, config: ModelConfig, **kw: object) -> LocalModel:
        model = LocalModel(name=name, config=config, modified_at=time.time(), **kw)  # type: ignore[arg-type]
        self.models[name.key] = model
        return model

    def copy(self, src: LocalModel, dst: ModelName) -> LocalModel:
        return self.add(
            dst,
            src.config,
            system=src.system,
            template=src.template,
            license=src.license,
            parameters=dict(src.parameters),
            parent_model=src.parent_model,
        )

    def delete(self, raw: str) -> bool:
        return self.models.pop(parse_name(raw).key, None) is not None

    def quantized(self, config: ModelConfig, quantize: str) -> ModelConfig:
        q = quantize.upper()
        old = _QUANT_BYTES.get(config.quantization.upper(), _QUANT_DEFAULT)
        new = _QUANT_BYTES.get(q, _QUANT_DEFAULT)
        return msgspec.structs.replace(config, quantization=q, size_gb=config.size_gb / old * new)

    def layer_digests(self, models: Iterable[LocalModel]) -> set[str]:
        return {layer.digest for m in models for layer in m.layers}
