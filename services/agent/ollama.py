"""The agent's HTTP client to its Ollama: one keep-alive aiohttp session, no per-request clients."""

from __future__ import annotations

import io
import logging
from typing import Any

import aiohttp
import msgspec

from services.protocol.messages import PsModel, TagModel

log = logging.getLogger(__name__)

_STREAM_BODY = 256 * 1024  # bytes; above this a request body is streamed to Ollama


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
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OllamaClient not started")
        return self._session

    def request(self, method: str, path: str, body: bytes | None) -> Any:
        """Start a request; use as ``async with client.request(...) as resp``.

        ``Host`` is always the backend's own address and no ``Origin`` is sent, so an Ollama bound
        to loopback never answers 403 to a proxied browser request (reference §0.4).
        """
        headers = {"Content-Type": "application/json"} if body else {}
        # large bodies go as a stream: aiohttp would otherwise write them in one blocking call
        data: bytes | io.BytesIO | None = io.BytesIO(body) if body and len(body) > _STREAM_BODY else body
        return self.session.request(method, self.base_url + path, data=data, headers=headers)

    async def _get(self, path: str) -> bytes:
        async with self.session.get(self.base_url + path, timeout=aiohttp.ClientTimeout(total=10)) as r:
            r.raise_for_status()
            return await r.read()

    async def tags(self) -> list[TagModel]:
        return _tags.decode(await self._get("/api/tags")).models or []

    async def ps(self) -> list[PsModel]:
        return _ps.decode(await self._get("/api/ps")).models or []

    async def version(self) -> str:
        return _version.decode(await self._get("/api/version")).version

    async def trained_context(self, name: str) -> int:
        """The model's trained context (``<arch>.context_length`` in /api/show); 0 if not given."""
        body = msgspec.json.encode({"model": name})
        async with self.session.post(
            self.base_url + "/api/show",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as r:
            r.raise_for_status()
            info = _show.decode(await r.read()).model_info or {}
        for k, v in info.items():
            if k.endswith(".context_length") and isinstance(v, int):
                return v
        return 0
