"""The direct NATS client: `AsyncClient` and its synchronous twin `Client`.

Replies are Ollama's own JSON objects (dicts), exactly what the HTTP API would return; errors raise
`ResponseError` with Ollama's message and HTTP status, like the official ``ollama`` client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import msgspec
from corral.gateway import bodies
from corral.gateway.management import unload_answerer, unload_everywhere
from corral.gateway.planner import Planner
from corral.gateway.sessions import Sessions
from corral.gateway.settings import GatewaySettings
from corral.protocol.errors import BadRequest, CorralError, ModelNotFound, not_found_message
from corral.protocol.priority import parse_priority
from corral.protocol.subjects import Subjects
from corral.routing import parse_strategy
from corral.runtime.buckets import ensure_buckets
from corral.runtime.fleet import FleetView
from corral.runtime.nats import NatsAuth, connect
from corral.runtime.policy import PolicyStore
from corral.transport import Reply, Transport, WorkRequest, model_work
from nats.aio.client import Client as NATS

Json = dict[str, Any]

_dec = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()


class ResponseError(Exception):
    def __init__(self, error: str, status_code: int = -1) -> None:
        super().__init__(error)
        self.error = error
        self.status_code = status_code


class AsyncClient:
    def __init__(
        self,
        nats_url: str = "nats://127.0.0.1:4222",
        *,
        root: str = "corral",
        queue_timeout: float = 600.0,
        nc: NATS | None = None,
        nats_creds: str = "",
        nats_tls_ca: str = "",
        nats_tls_cert: str = "",
        nats_tls_key: str = "",
    ) -> None:
        """``nats_creds``: a NATS identity from ``corral auth init`` (the operator's, or any with the
        rights of a gateway); ``nats_tls_*``: the CA, and a client certificate and key, for a NATS
        server that uses TLS. ``nc``: an open connection to use instead (not closed by the client)."""
        self._url = nats_url
        self._subjects = Subjects(root)
        # routed exactly as the gateway routes, under the gateway's defaults
        self._settings = GatewaySettings(
            root=root,
            queue_timeout_s=queue_timeout,
            nats_creds=nats_creds,
            nats_tls_ca=nats_tls_ca,
            nats_tls_cert=nats_tls_cert,
            nats_tls_key=nats_tls_key,
        )
        self._nc = nc
        self._own_nc = nc is None
        self._fleet: FleetView | None = None
        self._transport: Transport | None = None
        self._planner: Planner | None = None
        self._policy: PolicyStore | None = None

    async def connect(self) -> None:
        if self._planner is not None:
            raise RuntimeError("client already connected")
        if self._nc is None:
            self._nc = await connect(self._url, name="corral-client", auth=NatsAuth.of(self._settings))
        buckets = await ensure_buckets(
            self._nc.jetstream(), self._subjects, replicas=self._settings.js_replicas
        )
        self._fleet = FleetView(buckets.agents)
        await self._fleet.start()
        self._transport = Transport(
            self._nc,
            self._subjects,
            claim_timeout=self._settings.claim_timeout_s,
            warm_claim_timeout=self._settings.warm_claim_timeout_s,
            idle_timeout=self._settings.idle_timeout_s,
            members=self._fleet.knows,
        )
        await self._transport.start()
        self._fleet.on_gone(self._transport.agent_gone)  # its calls end now, not at the idle timeout
        self._policy = PolicyStore(buckets.policy)  # aliases and fallbacks, as the gateways use them
        await self._policy.start()
        sessions = Sessions(buckets.sessions) if self._settings.sessions else None
        self._planner = Planner(
            self._transport, self._fleet, self._settings, sessions=sessions, policy=self._policy
        )

    async def close(self) -> None:
        if self._planner is not None:
            await self._planner.stop()
            if self._planner.sessions is not None:
                await self._planner.sessions.close()
            self._planner = None
        if self._policy is not None:
            await self._policy.stop()
            self._policy = None
        if self._transport is not None:
            await self._transport.stop()
            self._transport = None
        if self._fleet is not None:
            await self._fleet.stop()
            self._fleet = None
        if self._own_nc and self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()
            self._nc = None

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- API ---------------------------------------------------------------------------------
    async def generate(self, model: str, prompt: str = "", *, stream: bool = False, **fields: Any) -> Any:
        return await self.request(
            "/api/generate", {"model": model, "prompt": prompt, **fields}, stream=stream
        )

    async def chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, **fields: Any
    ) -> Any:
        return await self.request(
            "/api/chat", {"model": model, "messages": list(messages), **fields}, stream=stream
        )

    async def embed(self, model: str, input: str | Sequence[str], **fields: Any) -> Json:
        result: Json = await self.request("/api/embed", {"model": model, "input": input, **fields})
        return result

    async def request(
        self,
        endpoint: str,
        body: Mapping[str, Any],
        *,
        stream: bool = False,
        vendor: str | None = None,
        strict: bool = False,
        strategy: str | None = None,
        priority: str | None = None,
    ) -> Any:
        """Any model endpoint (``/api/*`` or ``/v1/*``). ``stream=True`` returns an async iterator.
        The gateway's headers, as arguments: ``vendor`` a vendor to prefer, ``strict`` that vendor
        only (``X-Enforce-Strategy``), ``strategy`` how to route (``X-Load-Balancing-Strategy``:
        ``auto``, ``round_robin``, …), ``priority`` ``interactive`` or ``batch``."""
        if self._planner is None:
            raise RuntimeError("client not connected")
        payload = {**body}
        if endpoint in ("/api/generate", "/api/chat") or endpoint.startswith("/v1/"):
            payload["stream"] = stream
        encoded = _enc.encode(payload)
        try:
            try:
                how, preferred = parse_strategy(strategy or "")
            except ValueError as e:
                raise BadRequest(str(e)) from None
            model = str(body.get("model", ""))
            vendor = vendor or preferred
            work = model_work(endpoint, encoded, model, vendor=vendor, strict=strict, strategy=how)
            if priority is not None:
                work.priority = parse_priority(priority)
            try:
                view = bodies.decode_view(encoded)
            except msgspec.ValidationError as e:  # a field of the wrong type: Ollama's 400
                raise BadRequest(str(e)) from None
            bodies.derive(work, view)  # as the gateway routes: context, keep_alive, conversation
            if bodies.is_unload(endpoint, view):
                result = await self._unload(work)
                return _one(result) if stream else result
            reply = await self._planner.send(work)
        except ModelNotFound as e:
            message = not_found_message(endpoint, str(body.get("model", "")), e.message, e.vendor)
            raise ResponseError(message, e.status) from None
        except CorralError as e:
            raise ResponseError(e.message, e.status) from None
        if reply.status >= 400:
            async with reply:
                raise ResponseError(_error_text(await reply.read()), reply.status)
        if not stream:
            try:
                async with reply:
                    data = await reply.read()
            except CorralError as e:
                raise ResponseError(e.message, e.status) from None
            result = _dec.decode(data)
            if isinstance(result, dict) and "error" in result:
                raise ResponseError(str(result["error"]), reply.status)
            return result
        return _lines(reply)

    async def _unload(self, work: WorkRequest) -> Json:
        """``keep_alive: 0`` with nothing to run: every agent that has the model loaded lets it go
        (as through the gateway); Ollama's answer from one that did, else from one that has it."""
        assert self._planner is not None and work.model is not None
        answers = await unload_everywhere(self._planner, work)
        done = [r for r in answers.values() if not isinstance(r, Exception)]
        if not done:
            answerer = unload_answerer(self._planner, work)
            if answerer is None:
                raise ModelNotFound(work.model.key)
            async with await self._planner.send_to(answerer, work) as reply:
                done = [(reply.status, await reply.read(), "")]
        status, data, _ = next((r for r in done if r[0] == 200), done[0])
        if status >= 400:
            raise ResponseError(_error_text(data), status)
        result: Json = _dec.decode(data)
        return result


async def _one(item: Json) -> AsyncIterator[Json]:
    yield item


async def _lines(reply: Reply) -> AsyncIterator[Json]:
    async with reply:
        try:
            async for line in reply.lines():
                obj = _dec.decode(line)
                if isinstance(obj, dict) and "error" in obj:
                    raise ResponseError(str(obj["error"]))
                yield obj
        except CorralError as e:
            raise ResponseError(e.message, e.status) from None


def _error_text(data: bytes) -> str:
    try:
        obj = _dec.decode(data)
    except msgspec.DecodeError:
        return data.decode(errors="replace")
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    return data.decode(errors="replace")


class Client:
    """`AsyncClient` for synchronous code: its own event loop on a background thread."""

    def __init__(self, nats_url: str = "nats://127.0.0.1:4222", **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="corral-client", daemon=True)
        self._thread.start()
        self._client = AsyncClient(nats_url, **kwargs)
        self._call(self._client.connect())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def generate(self, model: str, prompt: str = "", *, stream: bool = False, **fields: Any) -> Any:
        return self._wrap(self._call(self._client.generate(model, prompt, stream=stream, **fields)), stream)

    def chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, **fields: Any
    ) -> Any:
        return self._wrap(self._call(self._client.chat(model, messages, stream=stream, **fields)), stream)

    def embed(self, model: str, input: str | Sequence[str], **fields: Any) -> Json:
        result: Json = self._call(self._client.embed(model, input, **fields))
        return result

    def request(self, endpoint: str, body: Mapping[str, Any], *, stream: bool = False, **kw: Any) -> Any:
        return self._wrap(self._call(self._client.request(endpoint, body, stream=stream, **kw)), stream)

    def _wrap(self, result: Any, stream: bool) -> Any:
        return self._iterate(result) if stream else result

    def _iterate(self, it: AsyncIterator[Json]) -> Iterator[Json]:
        while True:
            try:
                yield self._call(it.__anext__())
            except StopAsyncIteration:
                return
