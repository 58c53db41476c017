"""The Ollama endpoints Corral routes by model (the gateway's hot path)."""

from __future__ import annotations

from typing import Final

# requests that run a model: Ollama loads it first (or reloads it at the request's context)
MODEL_ENDPOINTS: Final = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    }
)
