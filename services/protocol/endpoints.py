"""The Ollama endpoints Corral routes by model (the gateway's hot path)."""

from __future__ import annotations

from typing import Final

import msgspec
from corral.protocol.errors import InvalidModelName
from corral.protocol.names import host_allowed, registry_host, registry_refused

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
        "/v1/responses",  # OpenAI's Responses API (Ollama 0.13.3 and later)
        "/v1/messages",  # Anthropic's Messages API (Ollama 0.14 and later)
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


# The body fields naming a model an Ollama fetches from (or sends to) a registry.
_REMOTE_FIELDS: Final = {
    "/api/pull": ("model", "name"),
    "/api/push": ("model", "name"),
    "/api/create": ("from",),
}


def remote_refused(endpoint: str, body: bytes, allowed: tuple[str, ...]) -> str | None:
    """Why a request may not run: a pull, push or create whose model names a registry not in
    ``allowed`` (Ollama's error wording); None when it may (or when the body does not parse:
    Ollama answers that itself)."""
    fields = _REMOTE_FIELDS.get(endpoint)
    if fields is None:
        return None
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    for field in fields:
        name = doc.get(field)
        if not isinstance(name, str) or not name:
            continue
        try:
            host = registry_host(name)
        except InvalidModelName:
            return f'invalid model name "{name[:80]}"'
        if not host_allowed(host, allowed):
            return registry_refused(host)
    return None
