"""The agent's client to its Ollama: one keep-alive connection pool, no per-request clients."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from corral.agent.http import HTTPClient, StatusError
from corral.protocol.messages import PsModel, TagModel

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
# what the agent's own calls raise when Ollama is unreachable, slow, answers an error or garbles it
OLLAMA_ERRORS = (OSError, TimeoutError, StatusError, msgspec.DecodeError)
CONTROL_TIMEOUT_S = 10.0  # the agent's own calls (tags, ps, version, show); proxied requests have none


class _Tags(msgspec.Struct):
    models: list[TagModel] | None = None


class _Ps(msgspec.Struct):
    models: list[PsModel] | None = None


class _Version(msgspec.Struct):
    version: str = ""


_tags = msgspec.json.Decoder(_Tags)
_ps = msgspec.json.Decoder(_Ps)
_version = msgspec.json.Decoder(_Version)


class _Show(msgspec.Struct):
    model_info: dict[str, Any] | None = None


_show = msgspec.json.Decoder(_Show)


class OllamaClient:
    """Typed calls to one Ollama over `corral.agent.http`; `request` is the proxied hot path."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._http: HTTPClient | None = None

    async def start(self) -> None:
        self._http = HTTPClient(self.base_url, connect_timeout=CONNECT_TIMEOUT_S)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def http(self) -> HTTPClient:
        if self._http is None:
            raise RuntimeError("OllamaClient not started")
        return self._http

    def request(self, method: str, path: str, body: bytes | None) -> Any:
        """Start a request; use as ``async with client.request(...) as resp``.

        ``Host`` is always the backend's own address and no ``Origin`` is sent, so an Ollama bound
        to loopback never answers 403 to a proxied browser request (Ollama checks both against
        OLLAMA_ORIGINS).
        """
        return self.http.request(method, path, body)

    async def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        async with asyncio.timeout(CONTROL_TIMEOUT_S), self.http.request(method, path, body) as r:
            await r.raise_for_status()
            return await r.read()

    async def tags(self) -> list[TagModel]:
        return _tags.decode(await self._call("GET", "/api/tags")).models or []

    async def ps(self) -> list[PsModel]:
        return _ps.decode(await self._call("GET", "/api/ps")).models or []

    async def version(self) -> str:
        return _version.decode(await self._call("GET", "/api/version")).version

    async def trained_context(self, name: str) -> int:
        """The model's trained context (``<arch>.context_length`` in /api/show); 0 if not given."""
        body = await self._call("POST", "/api/show", msgspec.json.encode({"model": name}))
        info = _show.decode(body).model_info or {}
        for k, v in info.items():
            if k.endswith(".context_length") and isinstance(v, int):
                return v
        return 0
