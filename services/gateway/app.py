"""The gateway: an ASGI app that looks like one Ollama server and is served by the whole fleet.

Hot endpoints (generate, chat, embed, embeddings and their /v1 twins) take a lean raw-ASGI path;
everything else goes through FastAPI routing. The lifespan owns the NATS connection, the KV watch
cache of the fleet and the dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from corral.client import views
from corral.client.dispatch import Dispatcher, DispatchSettings, Reply, WorkRequest, model_work
from corral.client.fleet import FleetView, pull_order
from corral.client.routing import STRATEGIES, parse_strategy
from corral.client.sessions import Sessions
from corral.gateway import bodies
from corral.gateway.errors import JSON, native_body
from corral.gateway.relay import (
    Receive,
    Scope,
    Send,
    read_body,
    relay,
    relay_reply,
    respond,
    respond_error,
)
from corral.gateway.settings import GatewaySettings
from corral.protocol.endpoints import MODEL_ENDPOINTS
from corral.protocol.errors import (
    BadRequest,
    CorralError,
    InvalidModelName,
    ModelNotFound,
    not_found_message,
)
from corral.protocol.names import VENDORS, ModelName, parse_name
from corral.protocol.subjects import Subjects
from corral.runtime.nats import connect, ensure_buckets
from corral.runtime.tasks import cancel_and_wait
from corral.runtime.telemetry import server_span, tracer
from corral.runtime.workqueue import depths, ensure_stream
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue
from opentelemetry.trace import TracerProvider
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

NDJSON_DEFAULT_STREAM = frozenset({"/api/generate", "/api/chat"})
STRATEGY_HEADER = b"x-load-balancing-strategy"
ENFORCE_HEADER = b"x-enforce-strategy"
SESSION_HEADER = b"x-corral-session"  # a client's own conversation id (overrides the derived key)
REPLICAS_HEADER = "X-Corral-Replicas"  # /api/pull: on how many agents (a number or "all")
VENDOR_HEADER = "X-Corral-Vendor"  # /api/pull: only agents of this vendor


class Gateway:
    def __init__(self, settings: GatewaySettings, *, tracer_provider: TracerProvider | None = None) -> None:
        if settings.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {settings.strategy!r}; use one of {', '.join(STRATEGIES)}")
        self.settings = settings
        self.subjects = Subjects(settings.root)
        self.nc: NATS | None = None
        self._fleet: FleetView | None = None
        self._dispatcher: Dispatcher | None = None
        self._rates_task: asyncio.Task[None] | None = None
        self._rates: views.Rates | None = None
        self._rates_seen = asyncio.Event()
        self._tracer = tracer(__name__, tracer_provider)
        self.app = self._build_app()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.nc = await connect(self.settings.nats_url, name="corral-gateway")
        buckets = await ensure_buckets(self.nc.jetstream(), self.subjects)
        await ensure_stream(self.nc.jetstream(), self.subjects, depth=self.settings.queue_depth)
        self._fleet = FleetView(buckets.agents)
        await self._fleet.start()
        self._dispatcher = Dispatcher(
            self.nc,
            self.subjects,
            self._fleet,
            DispatchSettings(
                claim_timeout=self.settings.claim_timeout_s,
                idle_timeout=self.settings.idle_timeout_s,
                queue_timeout=self.settings.queue_timeout_s,
                strategy=self.settings.strategy,
                queue=self.settings.queue,
                load_grace_s=self.settings.load_grace_s,
                recheck_s=self.settings.queue_recheck_s,
                auto_pull=self.settings.auto_pull,
            ),
            tracer=self._tracer,
            sessions=Sessions(buckets.sessions) if self.settings.sessions else None,
        )
        await self._dispatcher.start()
        self._rates_task = asyncio.create_task(self._watch_rates(buckets.views), name="rates-watch")
        log.info("gateway ready: %d agents in the fleet", len(self._fleet.agents()))

    async def _watch_rates(self, kv: KeyValue) -> None:
        """Keep the aggregator's latest rates (the only part of /api/status it alone knows)."""
        watcher = await kv.watch(views.RATES_KEY)
        try:
            async for entry in watcher:
                if entry is None or not entry.value or entry.operation in ("DEL", "PURGE"):
                    continue
                with contextlib.suppress(msgspec.DecodeError):
                    self._rates = views.rates_decoder.decode(entry.value)
                    self._rates_seen.set()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    @property
    def rates(self) -> views.Rates | None:
        """The aggregator's latest rolling figures (None until an aggregator has written them)."""
        return self._rates

    async def wait_rates(self, predicate: Callable[[views.Rates], bool], timeout: float) -> views.Rates:
        """Wait until the aggregator's figures satisfy ``predicate`` (woken by each KV update)."""
        async with asyncio.timeout(timeout):
            while self._rates is None or not predicate(self._rates):
                self._rates_seen.clear()
                await self._rates_seen.wait()
        return self._rates

    async def stop(self) -> None:
        if self._rates_task is not None:
            await cancel_and_wait([self._rates_task])
        if self._dispatcher is not None:
            await self._dispatcher.stop()
            if self._dispatcher.sessions is not None:
                await self._dispatcher.sessions.close()
        if self._fleet is not None:
            await self._fleet.stop()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    @property
    def fleet(self) -> FleetView:
        assert self._fleet is not None, "gateway not started"
        return self._fleet

    @property
    def dispatcher(self) -> Dispatcher:
        assert self._dispatcher is not None, "gateway not started"
        return self._dispatcher

    # -- ASGI --------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in MODEL_ENDPOINTS:
            await self._model_request(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _model_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint: str = scope["path"]
        openai = endpoint.startswith("/v1/")
        carrier = {
            k.decode(): v.decode() for k, v in scope["headers"] if k in (b"traceparent", b"tracestate")
        }
        with server_span(self._tracer, f"POST {endpoint}", carrier):
            try:
                body = await read_body(receive)
            except ConnectionResetError:
                return
            if not body.strip():
                await respond_error(send, BadRequest("missing request body"), openai=openai)
                return
            try:
                view = bodies.decode_view(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                # let an Ollama word the error exactly as it would
                await relay(
                    self.dispatcher, WorkRequest(endpoint=endpoint, body=body), receive, send, openai=openai
                )
                return
            try:
                work, raw = self._route(endpoint, body, view, scope)
            except CorralError as e:
                await respond_error(send, e, openai=openai, endpoint=endpoint)
                return
            if bodies.is_unload(endpoint, view):
                await self._unload(work, raw, receive, send)
                return
            await relay(self.dispatcher, work, receive, send, openai=openai, raw_model=raw)

    def _route(
        self, endpoint: str, body: bytes, view: bodies.RouteView, scope: Scope
    ) -> tuple[WorkRequest, str]:
        raw = view.model or ""
        if not raw and endpoint in ("/api/generate", "/api/embed"):
            raise ModelNotFound("model '' not found")
        vendor, strict, strategy, session = None, False, None, None
        for k, v in scope["headers"]:
            if k == STRATEGY_HEADER:
                try:
                    strategy, vendor = parse_strategy(v.decode())
                except ValueError as e:
                    raise BadRequest(str(e)) from None
            elif k == ENFORCE_HEADER:
                strict = v.decode().lower() in ("1", "true", "yes")
            elif k == SESSION_HEADER and v.strip():
                session = v.decode().strip()
        work = model_work(endpoint, body, raw, vendor=vendor, strict=strict, strategy=strategy)
        work.num_ctx = bodies.num_ctx(view)
        if session is not None:  # the client names its conversation: every turn after the first follows
            work.session = "h." + hashlib.blake2b(session.encode(), digest_size=12).hexdigest()
            work.follow_up = True
        elif view.messages and work.model is not None:
            work.session, work.follow_up = bodies.session(work.model.key, view)
        return work, raw

    async def _unload(self, work: WorkRequest, raw: str, receive: Receive, send: Send) -> None:
        """``keep_alive: 0`` with nothing to run: every agent holding the model must let it go."""
        assert work.model is not None
        work.unload = True
        key = work.model.key
        loaded = [a.id for a in self.fleet.loaded_on(key) if not work.strict or a.vendor == work.vendor]
        if not loaded:
            holders = self.fleet.with_model(key)
            if not holders:
                await respond_error(
                    send, ModelNotFound(key), openai=False, endpoint=work.endpoint, raw_model=raw
                )
                return
            await relay(self.dispatcher, work, receive, send, raw_model=raw, target=holders[0].id)
            return
        replies = await asyncio.gather(
            *(self.dispatcher.send_to(a, work) for a in loaded), return_exceptions=True
        )
        first: tuple[int, bytes, str] | None = None
        for r in replies:
            if isinstance(r, BaseException):
                log.warning("unload on one agent failed: %s", r)
                continue
            data = await r.read()
            if first is None or (first[0] != 200 and r.status == 200):
                first = (r.status, data, r.content_type)
        if first is None:
            await respond_error(send, ModelNotFound(key), openai=False, endpoint=work.endpoint, raw_model=raw)
            return
        await respond(send, first[0], first[1], first[2])

    # -- the rest of the API (FastAPI) ---------------------------------------------------------
    def _build_app(self) -> FastAPI:
        gw = self

        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            await gw.start()
            try:
                yield
            finally:
                await gw.stop()

        app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
            # gin's plain-text defaults, which Ollama clients see from a real server
            if exc.status_code == 405:
                return PlainTextResponse("405 method not allowed", status_code=405)
            if exc.status_code == 404:
                return PlainTextResponse("404 page not found", status_code=404)
            return PlainTextResponse(str(exc.detail), status_code=exc.status_code)

        @app.api_route("/", methods=["GET", "HEAD"])
        async def root() -> Response:
            return PlainTextResponse("Ollama is running")

        @app.api_route("/api/version", methods=["GET", "HEAD"])
        async def version() -> Response:
            v = views.fleet_version(gw.fleet.agents(), gw.settings.ollama_version)
            return Response(msgspec.json.encode({"version": v}), media_type=JSON)

        @app.api_route("/api/tags", methods=["GET", "HEAD"])
        async def tags() -> Response:
            return Response(views.tags_body(gw.fleet.agents()), media_type=JSON)

        @app.get("/api/ps")
        async def ps() -> Response:
            return Response(views.ps_body(gw.fleet.agents()), media_type=JSON)

        @app.get("/api/status")
        async def status() -> Response:
            assert gw.nc is not None
            queue = views.queue_by_model(await depths(gw.nc.jetstream(), gw.subjects))
            return Response(views.status_body(gw.fleet.agents(), gw._rates, queue), media_type=JSON)

        @app.get("/v1/models")
        async def v1_models() -> Response:
            return Response(views.v1_models_body(gw.fleet.agents()), media_type=JSON)

        @app.get("/v1/models/{model}")
        async def v1_model(model: str) -> Response:
            body = views.v1_model_body(gw.fleet.agents(), model)
            if body is None:
                from corral.gateway.errors import openai_body

                return Response(
                    openai_body(404, f"model '{model}' not found"), status_code=404, media_type=JSON
                )
            return Response(body, media_type=JSON)

        @app.post("/api/show")
        async def show(request: Request) -> Response:
            return await gw._to_holder(request, "/api/show")

        @app.post("/api/push")
        async def push(request: Request) -> Response:
            return await gw._to_holder(request, "/api/push")

        @app.post("/api/pull")
        async def pull(request: Request) -> Response:
            return await gw._pull(request)

        @app.post("/api/create")
        async def create(request: Request) -> Response:
            return await gw._to_first(request, "/api/create")

        @app.api_route("/api/blobs/{digest}", methods=["HEAD", "POST"])
        async def blobs(request: Request, digest: str) -> Response:
            return await gw._to_first(request, f"/api/blobs/{digest}")

        @app.delete("/api/delete")
        async def delete(request: Request) -> Response:
            return await gw._to_all_holders(request, "/api/delete", "DELETE")

        @app.post("/api/copy")
        async def copy(request: Request) -> Response:
            return await gw._to_all_holders(request, "/api/copy", "POST")

        return app

    # -- model management, routed by who has what -------------------------------------------
    async def _name(self, request: Request, field: str = "model") -> tuple[bytes, str, ModelName]:
        body = await request.body()
        if not body.strip():
            raise BadRequest("missing request body")
        try:
            obj = msgspec.json.decode(body)
        except msgspec.DecodeError as e:
            raise BadRequest(str(e)) from None
        raw = ""
        if isinstance(obj, dict):
            raw = obj.get(field) or obj.get("name") or ""
        if not raw:
            raise BadRequest("model is required")
        if not isinstance(raw, str):
            raise BadRequest("invalid model name")
        return body, raw, parse_name(raw)

    async def _to_holder(self, request: Request, endpoint: str) -> Response:
        try:
            body, raw, model = await self._name(request)
        except CorralError as e:
            return _error(e)
        holders = sorted(self.fleet.with_model(model.key), key=lambda a: a.in_flight)
        if not holders:
            msg = not_found_message(endpoint, raw, model.display)
            return Response(native_body(msg), status_code=404, media_type=JSON)
        return RelayResponse(self, WorkRequest(endpoint=endpoint, body=body, model=None), holders[0].id)

    async def _to_first(self, request: Request, endpoint: str) -> Response:
        """Blobs and creates go to one agent, the same one each time, so a create finds its blobs."""
        body = await request.body()
        agents = sorted(a.id for a in self.fleet.agents() if a.status == "active")
        if not agents:
            return _error(ModelNotFound("no agents in the fleet"))
        work = WorkRequest(endpoint=endpoint, body=body, method=request.method)
        return RelayResponse(self, work, agents[0])

    async def _pull(self, request: Request) -> Response:
        """Through the registry (replicas, vendor, merged progress) when one runs, else to one agent.

        ``X-Corral-Replicas: N`` (or ``all``) and ``X-Corral-Vendor: amd`` choose where the model
        goes; a plain Ollama client gets one copy, on the agent with the fewest models.
        """
        try:
            body, raw, model = await self._name(request)
            fields = msgspec.json.decode(body)
            replicas = request.headers.get(REPLICAS_HEADER, "1").strip().lower()
            vendor = request.headers.get(VENDOR_HEADER, "").strip().lower() or None
            if replicas != "all" and not (replicas.isdigit() and int(replicas) > 0):
                raise BadRequest(f"{REPLICAS_HEADER} must be a positive number or 'all'")
            if vendor is not None and vendor not in VENDORS:
                raise BadRequest(f"{VENDOR_HEADER} must be one of {', '.join(VENDORS)}")
        except CorralError as e:
            return _error(e)
        order = {
            **fields,
            "model": raw,
            "replicas": 1 if replicas == "all" else int(replicas),
            "all": replicas == "all",
            "vendor": vendor,
        }
        work = WorkRequest(endpoint="/api/pull", body=msgspec.json.encode(order))
        try:
            reply = await self.dispatcher.send_service(
                self.subjects.registry("pull"), work, timeout=self.settings.claim_timeout_s
            )
        except CorralError as e:  # the registry took it and went silent
            return _error(e)
        if reply is not None:
            return ReplyResponse(reply)
        # no registry running: the one agent the registry would have chosen first
        agents = pull_order(self.fleet, model.key, vendor)
        if not agents:
            return _error(CorralError("no agents in the fleet"))
        return RelayResponse(self, WorkRequest(endpoint="/api/pull", body=body), agents[0].id)

    async def _to_all_holders(self, request: Request, endpoint: str, method: str) -> Response:
        field = "source" if endpoint == "/api/copy" else "model"
        try:
            body, raw, model = await self._name(request, field)
        except InvalidModelName as e:
            what = "source" if endpoint == "/api/copy" else "name"
            return _error(BadRequest(f'{what} "{e.name}" is invalid'))
        except CorralError as e:
            return _error(e)
        holders = self.fleet.with_model(model.key)
        if not holders:
            text = f"model '{raw}' not found" if endpoint == "/api/delete" else f'model "{raw}" not found'
            return Response(native_body(text), status_code=404, media_type=JSON)
        work = WorkRequest(endpoint=endpoint, body=body, method=method)
        replies = await asyncio.gather(
            *(self.dispatcher.send_to(a.id, work) for a in holders), return_exceptions=True
        )
        results: list[tuple[int, bytes]] = []
        for r in replies:
            if isinstance(r, BaseException):
                log.warning("%s on one agent failed: %s", endpoint, r)
                continue
            results.append((r.status, await r.read()))
        ok = [r for r in results if r[0] == 200]
        if ok:
            return Response(ok[0][1], status_code=200)
        if results:
            return Response(results[0][1], status_code=results[0][0], media_type=JSON)
        return _error(CorralError(f"{endpoint} failed on every agent"))


def _error(err: CorralError) -> Response:
    return Response(native_body(err.message), status_code=err.status, media_type=JSON)


class RelayResponse(Response):
    """A FastAPI response that is the agent's reply, streamed through as it comes."""

    def __init__(self, gateway: Gateway, work: WorkRequest, target: str | None = None) -> None:
        self._gw, self._work, self._target = gateway, work, target
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await relay(self._gw.dispatcher, self._work, receive, send, target=self._target)


class ReplyResponse(Response):
    """A FastAPI response relaying a reply that has already begun (its head is in hand)."""

    def __init__(self, reply: Reply) -> None:
        self._reply = reply
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await relay_reply(self._reply, receive, send)


def create_app(settings: GatewaySettings) -> Gateway:
    return Gateway(settings)
