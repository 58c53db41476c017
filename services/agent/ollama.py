"""The agent's client to its Ollama: one keep-alive connection pool, no per-request clients.

`OllamaClient.request` sends a body the agent holds (the hot path, `corral.agent.http`);
`OllamaClient.upload` streams a body the agent receives in chunks (a blob upload, any request body
larger than a NATS message) with its declared ``Content-Length``, so Ollama sees an ordinary
upload, over aiohttp, which writes a body from an async iterator. Both answer an `Answer`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol

import aiohttp
import msgspec
from corral.agent.http import HTTPClient, HTTPError, StatusError
from corral.protocol.messages import ModelMeta, PsModel, TagModel

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


class Answer(Protocol):
    """Ollama's answer as the worker reads it: its head, then its body."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...  # names in lower case

    @property
    def content_length(self) -> int | None: ...

    async def read(self) -> bytes: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...


class _Uploaded:
    """An `Answer` over aiohttp's response; its failures are `HTTPError` (an OSError), as the hot
    path's are, or the body's own failure when that is what broke the exchange."""

    __slots__ = ("_resp", "_upload", "content_length", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, upload: _Upload) -> None:
        self._resp = resp
        self._upload = upload
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.headers.items()}
        self.content_length = resp.content_length

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self])

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._resp.content.iter_any():
                yield piece
        except aiohttp.ClientError as e:
            raise self._upload.failure(e) from e


class _Upload:
    """``async with``: one streamed request and its answer; leaving it closes an unread answer."""

    __slots__ = ("_chunks", "_error", "_method", "_owner", "_path", "_resp", "_size")

    def __init__(
        self, owner: OllamaClient, method: str, path: str, chunks: AsyncIterator[bytes], size: int
    ) -> None:
        self._owner, self._method, self._path = owner, method, path
        self._chunks, self._size = chunks, size
        self._error: BaseException | None = None  # what the body raised while aiohttp sent it
        self._resp: aiohttp.ClientResponse | None = None

    def failure(self, e: aiohttp.ClientError) -> BaseException:
        """What to raise for ``e``: the body's own error when it broke the exchange."""
        return self._error if self._error is not None else HTTPError(f"upload to ollama failed: {e}")

    async def _body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks:
                yield chunk
        except Exception as e:  # kept to be raised in place of aiohttp's wrapping of it
            self._error = e
            raise

    async def __aenter__(self) -> _Uploaded:
        ctype = "application/octet-stream" if self._path.startswith("/api/blobs/") else "application/json"
        headers = {"Content-Length": str(self._size), "Content-Type": ctype}
        session = self._owner.uploads
        try:
            self._resp = await session.request(
                self._method, self._owner.base_url + self._path, data=self._body(), headers=headers
            )
        except aiohttp.ClientError as e:
            raise self.failure(e) from e
        return _Uploaded(self._resp, self)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._resp is not None:
            self._resp.release()  # an answer not read to its end closes its connection
            self._resp = None


class OllamaClient:
    """Typed calls to one Ollama over `corral.agent.http`; `request` is the proxied hot path."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._http: HTTPClient | None = None
        self._uploads: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = HTTPClient(self.base_url, connect_timeout=CONNECT_TIMEOUT_S)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._uploads is not None:
            await self._uploads.close()
            self._uploads = None

    @property
    def uploads(self) -> aiohttp.ClientSession:
        """The session for streamed bodies, opened with the first (most agents never need it)."""
        if self._http is None:
            raise RuntimeError("OllamaClient not started")
        if self._uploads is None:
            self._uploads = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                skip_auto_headers=("Accept-Encoding", "User-Agent"),  # Ollama's bytes, as they are
                auto_decompress=False,
            )
        return self._uploads

    @property
    def http(self) -> HTTPClient:
        if self._http is None:
            raise RuntimeError("OllamaClient not started")
        return self._http

    def request(self, method: str, path: str, body: bytes | None) -> AbstractAsyncContextManager[Answer]:
        """Start a request; use as ``async with client.request(...) as resp``.

        ``Host`` is always the backend's own address and no ``Origin`` is sent, so an Ollama bound
        to loopback never answers 403 to a proxied browser request (Ollama checks both against
        OLLAMA_ORIGINS).
        """
        return self.http.request(method, path, body)

    def upload(self, method: str, path: str, chunks: AsyncIterator[bytes], size: int) -> _Upload:
        """Start a request whose body of ``size`` bytes is ``chunks``, sent as they come; use as
        ``async with client.upload(...) as resp``. A failure of ``chunks`` is raised as it is."""
        return _Upload(self, method, path, chunks, size)

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

    async def model_meta(self, name: str) -> ModelMeta:
        """The model's shape from /api/show's ``model_info`` (fields not given read as 0)."""
        body = await self._call("POST", "/api/show", msgspec.json.encode({"model": name}))
        return meta_of(_show.decode(body).model_info or {})


def meta_of(info: Mapping[str, Any]) -> ModelMeta:
    """`ModelMeta` from Ollama's ``model_info``: keys ``<arch>.…`` where ``general.architecture``
    names ``<arch>`` (any prefix is accepted when it does not). The head dimension is
    ``attention.key_length`` when given, else ``embedding_length / attention.head_count``, as
    Ollama's own estimate takes it."""
    arch = info.get("general.architecture")

    def field(suffix: str) -> int:
        if isinstance(arch, str):
            v = info.get(f"{arch}.{suffix}")
            return v if isinstance(v, int) and not isinstance(v, bool) else 0
        for k, v in info.items():
            if k.endswith("." + suffix) and isinstance(v, int) and not isinstance(v, bool):
                return v
        return 0

    heads = field("attention.head_count")
    head_dim = field("attention.key_length") or (field("embedding_length") // heads if heads else 0)
    return ModelMeta(
        layers=field("block_count"),
        kv_heads=field("attention.head_count_kv") or heads,
        head_dim=head_dim,
        trained_ctx=field("context_length"),
    )
