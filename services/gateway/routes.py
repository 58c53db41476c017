"""Everything but the hot model endpoints, as a FastAPI app: the fleet's merged views (tags, ps,
/v1/models, version, status) and model management (`corral.gateway.management`)."""

from __future__ import annotations

import contextlib
import inspect
import re
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import TYPE_CHECKING, Any

import msgspec
from corral import views
from corral.gateway import console, management, userviews
from corral.gateway.access import model_allowed
from corral.gateway.auth import hides, key_of
from corral.gateway.batch import routes as batch_routes
from corral.gateway.errors import JSON, METHOD_NOT_ALLOWED, NOT_FOUND, openai_body
from corral.gateway.metrics import CONTENT_TYPE
from corral.gateway.policy import v1_alias, with_aliases
from corral.protocol.endpoints import MODEL_ENDPOINTS
from corral.protocol.errors import BadRequest
from corral.protocol.gohttp import slash_redirect
from corral.runtime.health import not_ready
from corral.runtime.workqueue import depths
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

# Ollama's own check of a blob digest (both separators, either case): at most 71 safe characters
DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}")

if TYPE_CHECKING:
    from corral.gateway.app import Gateway


# What dashboards, probes and the console poll: with tracing on (``--otlp-endpoint``) FastAPI's own
# spans of these would outnumber the requests' (three spans every poll)
UNTRACED = frozenset(
    {"/", "/ready", "/metrics", "/api/status", "/api/ps", "/api/tags", "/api/version", "/v1/models"}
)


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    path: str = scope.get("path", "")
    return path in UNTRACED or path.startswith("/console")


def _telemetry() -> dict[str, Any]:
    """FastAPI's own tracing (in the versions that have it): a SERVER span per request, not per
    dependency and endpoint, and none for what is polled (`UNTRACED`). The model endpoints have
    spans of their own (`corral.gateway.app`)."""
    if "telemetry" not in inspect.signature(FastAPI).parameters:
        return {}
    return {"telemetry": {"operation_spans": False, "exclude": _untraced}}


def _routed(app: FastAPI, path: str, method: str) -> bool:
    """Whether the gateway serves ``method`` on ``path`` (parameters matched): gin redirects a
    trailing slash only to a route of the request's own method. The model endpoints are served
    before the app (`corral.gateway.app`), a trailing slash's redirect here."""
    if method == "POST" and path in MODEL_ENDPOINTS:
        return True
    scope = {"type": "http", "path": path, "root_path": "", "method": method}
    return any(r.matches(scope)[0] is Match.FULL for r in app.routes)


def build_app(gw: Gateway) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, **_telemetry())
    app.router.redirect_slashes = False  # gin's redirect instead (below), not Starlette's absolute 307

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # gin's defaults, which Ollama clients see from a real server: a trailing slash redirected,
        # plain text (no charset) for the rest, 405 with its Allow header
        path = request.url.path
        if (
            exc.status_code == 404
            and len(path) > 1
            and path[-1] == "/"
            and _routed(app, path[:-1], request.method)
        ):
            query = f"?{request.url.query}" if request.url.query else ""
            status, headers, body = slash_redirect(request.method, path[:-1] + query)
            return Response(body, status_code=status, headers=dict(headers))
        text = {405: METHOD_NOT_ALLOWED, 404: NOT_FOUND}.get(exc.status_code, str(exc.detail))
        plain = {"content-type": "text/plain", **(exc.headers or {})}
        return Response(text, status_code=exc.status_code, headers=plain)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root() -> Response:
        return PlainTextResponse("Ollama is running")

    @app.get("/ready")
    async def ready() -> Response:
        # readiness, not liveness (that is `/`): NATS connected and JetStream answering
        problem = await not_ready(gw.nc, gw.subjects.queue_stream)
        if problem is not None:
            body = msgspec.json.encode({"status": "not ready", "error": problem})
            return Response(body, status_code=503, media_type=JSON)
        return Response(msgspec.json.encode({"status": "ready"}), media_type=JSON)

    @app.get("/metrics")
    async def metrics() -> Response:  # Prometheus: this gateway's requests and the fleet's state
        assert gw.nc is not None
        body = await gw.planner.metrics.scrape(gw.nc, gw.subjects)
        return Response(body, media_type=CONTENT_TYPE)

    @app.api_route("/api/version", methods=["GET", "HEAD"])
    async def version() -> Response:
        v = views.fleet_version(gw.fleet.agents(), gw.settings.ollama_version)
        return Response(msgspec.json.encode({"version": v}), media_type=JSON)

    @app.api_route("/api/tags", methods=["GET", "HEAD"])
    async def tags(request: Request) -> Response:
        return Response(userviews.tags_body(gw.fleet.agents(), key_of(request.scope)), media_type=JSON)

    @app.get("/api/ps")
    async def ps(request: Request) -> Response:
        return Response(userviews.ps_body(gw.fleet.agents(), key_of(request.scope)), media_type=JSON)

    @app.get("/api/status")
    async def status(request: Request) -> Response:
        assert gw.nc is not None
        queue = views.queue_by_model(await depths(gw.nc, gw.subjects))
        pins = gw.policy.policy.pins
        t = gw.planner.transport
        away = gw.planner.outage.away_s(t.nc.is_connected, time.monotonic(), t.epoch())
        body = userviews.status_body(gw.fleet.agents(), gw.rates, queue, key_of(request.scope), pins, away)
        return Response(body, media_type=JSON)

    @app.get("/v1/models")
    async def v1_models(request: Request) -> Response:
        key, agents = key_of(request.scope), gw.fleet.agents()
        body = userviews.v1_models_body(agents, key)
        rules = gw.policy.policy
        # a key's narrower list: an alias it may use serves a model it may not see, found in the fleet's
        narrowed = key is not None and bool(key.models) and bool(rules.aliases)
        body = with_aliases(
            body,
            rules,
            lambda name: key is None or model_allowed(key.models, name),
            userviews.v1_models_body(agents, None) if narrowed else None,
        )
        return Response(body, media_type=JSON)

    @app.get("/v1/models/{model}")
    async def v1_model(request: Request, model: str) -> Response:
        agents = gw.fleet.agents()
        body = None
        if not hides(request.scope, model):
            body = views.v1_model_body(agents, model)
            if body is None:  # an alias `/v1/models` lists (its name is what the key's list holds to)
                body = v1_alias(gw.policy.policy, model, lambda target: views.v1_model_body(agents, target))
        if body is None:
            return Response(openai_body(404, f"model '{model}' not found"), status_code=404, media_type=JSON)
        return Response(body, media_type=JSON)

    @app.post("/api/show")
    async def show(request: Request) -> Response:
        return await management.to_holder(gw.planner, request, "/api/show", hidden=hides)

    @app.post("/api/push")
    async def push(request: Request) -> Response:
        return await management.to_holder(gw.planner, request, "/api/push")

    @app.post("/api/pull")
    async def pull(request: Request) -> Response:
        return await management.pull(gw.planner, request)

    @app.post("/api/create")
    async def create(request: Request) -> Response:
        return await management.create(gw.planner, request)

    @app.api_route("/api/blobs/{digest}", methods=["HEAD", "POST"])
    async def blobs(request: Request, digest: str) -> Response:
        if not DIGEST.fullmatch(digest):  # before it goes anywhere near a NATS header
            return management.error(BadRequest("invalid digest format"))
        return await management.to_first(gw.planner, request, f"/api/blobs/{digest}")

    @app.delete("/api/delete")
    async def delete(request: Request) -> Response:
        return await management.to_all_holders(gw.planner, request, "/api/delete", "DELETE")

    @app.post("/api/copy")
    async def copy(request: Request) -> Response:
        return await management.to_all_holders(gw.planner, request, "/api/copy", "POST")

    console.mount(app, gw)  # /console and its calls under /api/corral/
    batch_routes.mount(app, gw)  # /v1/files and /v1/batches
    return app
