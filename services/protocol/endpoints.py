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

# What an agent asks of its Ollama on a peer's behalf: exactly these methods and paths (Ollama's
# API, https://github.com/ollama/ollama/blob/main/docs/api.md, and its OpenAI-compatible routes). A
# work message for anything else is refused, so no NATS client can make an agent send an arbitrary
# request to the Ollama beside it.
SERVED: Final = frozenset(
    {("POST", e) for e in MODEL_ENDPOINTS}
    | {
        ("POST", "/api/show"),
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
        ("GET", "/api/tags"),
        ("GET", "/api/ps"),
        ("GET", "/api/version"),
        ("GET", "/v1/models"),
    }
)
_BLOBS: Final = "/api/blobs/"
_BLOB_DIGEST_LENGTH: Final = len("sha256:") + 64
_V1_MODEL: Final = "/v1/models/"


def served(method: str, endpoint: str) -> bool:
    """Whether an agent serves ``method`` on ``endpoint`` (see `SERVED`; plus a blob by digest and
    one model of ``/v1/models``)."""
    if (method, endpoint) in SERVED:
        return True
    if endpoint.startswith(_BLOBS):
        digest = endpoint[len(_BLOBS) :]
        return method in ("HEAD", "POST") and len(digest) == _BLOB_DIGEST_LENGTH and digest[6] in ":-"
    return method == "GET" and endpoint.startswith(_V1_MODEL) and "/" not in endpoint[len(_V1_MODEL) :]
