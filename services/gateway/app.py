"""The gateway: an ASGI app that looks like one Ollama server and is served by the whole fleet.

Hot endpoints (generate, chat, embed, embeddings and their /v1 twins) take a lean raw-ASGI path;
everything else goes through FastAPI routing (`corral.gateway.routes`). The lifespan owns the NATS
connection, the KV watch cache of the fleet and the planner.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable

import msgspec
import nats.errors
from corral import views
from corral.gateway import bodies, management
from corral.gateway.access import ApiKey, model_allowed
from corral.gateway.asgi import Receive, Scope, Send
from corral.gateway.auth import MODEL, Access, key_of
from corral.gateway.batch.lifecycle import BatchLimits
from corral.gateway.batch.runner import BatchRunner
from corral.gateway.cors import Gate, machine_origins
from corral.gateway.edge import BODY, Edge
from corral.gateway.errors import METHOD_NOT_ALLOWED, TOO_DEEP, dialect, plain
from corral.gateway.keys import open_key_buckets
from corral.gateway.metrics import OTHER, known_label
from corral.gateway.planner import Planner
from corral.gateway.relay import Sent, relay, respond_error
from corral.gateway.routes import build_app
from corral.gateway.sessions import Sessions
from corral.gateway.settings import GatewaySettings
from corral.protocol.endpoints import MODEL_ENDPOINTS
from corral.protocol.envelope import trace_context
from corral.protocol.errors import BadRequest, CorralError, Forbidden, ModelNotFound
from corral.protocol.priority import HTTP_HEADER as PRIORITY_HEADER
from corral.protocol.priority import INTERACTIVE, capped, parse_priority
from corral.protocol.subjects import Subjects
from corral.routing import STRATEGIES, Router, parse_strategy
from corral.runtime.buckets import Reopener, ensure_buckets_at_start
from corral.runtime.fleet import FleetView, IdInUse, received_at
from corral.runtime.kvwatch import watch_until, watching
from corral.runtime.nats import NatsAuth, NatsRefused, connect, listened
from corral.runtime.policy import PolicyStore
from corral.runtime.tasks import cancel_and_wait, supervise
from corral.runtime.telemetry import server_span, set_http_status, set_model, tracer
from corral.runtime.workqueue import QueueLimits
from corral.transport import Transport, WorkRequest, model_work
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue
from opentelemetry.trace import Span, TracerProvider

log = logging.getLogger(__name__)

STRATEGY_HEADER = b"x-load-balancing-strategy"
ENFORCE_HEADER = b"x-enforce-strategy"
SESSION_HEADER = b"x-corral-session"  # a client's own conversation id (overrides the derived key)


def trace_carrier(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's W3C trace context, when well formed and within W3C's limits; else nothing."""
    parent = state = None
    for k, v in headers:
        if k == b"traceparent":
            parent = v.decode("latin-1")
        elif k == b"tracestate":
            state = v.decode("latin-1")
    return trace_context(parent, state)


def _text(name: bytes, value: bytes) -> str:
    """A header value as text; a `BadRequest` when it is not UTF-8."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise BadRequest(f"invalid {name.decode('latin-1')} header") from None


class Gateway:
    """``router`` carries the routing strategies' state; pass ``Router(seed=N)`` for a reproducible
    ``random`` strategy (benchmarks).

    Twenty attributes: the settings with what they give (subjects, edge, tracer, router), the
    NATS connection with its closed-for-good event and reopener, the seven parts it serves with
    (fleet view, transport, planner, the FastAPI app, the model policy, the API keys when on, the
    batch runner with its limits) and the aggregator's rates with their watch (task, latest figures,
    arrival and restart events)."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        router: Router | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        if settings.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {settings.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ValueError("HTTPS needs both --tls-cert and --tls-key")
        self.settings = settings
        self.subjects = Subjects(settings.root)
        self.nc: NATS | None = None
        self._router = router
        self._fleet: FleetView | None = None
        self._transport: Transport | None = None
        self._planner: Planner | None = None
        self._policy: PolicyStore | None = None  # aliases and fallbacks (`corral.gateway.policy`)
        self._access: Access | None = None  # API keys, limits and usage (CORRAL_AUTH=keys)
        self._batch_limits = BatchLimits(
            in_flight=settings.batch_in_flight,
            slots=settings.batch_slots,
            attempts=settings.batch_attempts,
            ack_wait_s=settings.batch_ack_wait_s,
            max_lines=settings.batch_max_lines,
        )
        self._batches: BatchRunner | None = None  # the Batch API's share of the fleet's batch lines
        self._rates_task: asyncio.Task[None] | None = None
        self._rates: views.Rates | None = None
        self._rates_at = 0.0  # when they were written, on this process's monotonic clock
        self._rates_seen = asyncio.Event()
        self._rates_restart = asyncio.Event()
        self._reopener: Reopener | None = None
        self.lost = asyncio.Event()  # the NATS connection closed for good: the process must exit
        self._tracer = tracer(__name__, tracer_provider)
        self._edge = Edge(
            max_body_bytes=settings.max_body_bytes,
            max_requests=settings.max_requests,
            body_timeout_s=settings.body_timeout_s,
            max_held_bytes=settings.max_bodies_bytes,
        )
        self._gate = Gate(machine_origins(settings.host, settings.origins))  # Host and Origin
        self.app = build_app(self)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and open everything; a second call (the HTTP lifespan after ``corral gateway``
        started it first) does nothing."""
        if self.nc is not None:
            return
        replicas = self.settings.js_replicas
        self.nc = await connect(
            self.settings.nats_url,
            name="corral-gateway",
            auth=NatsAuth.of(self.settings),
            on_closed=self.lost.set,
            on_reconnected=self._reconnected,
            on_disconnected=self._disconnected,
        )
        queue = QueueLimits(depth=self.settings.queue_depth, max_bytes=self.settings.queue_max_bytes)
        buckets = await ensure_buckets_at_start(
            self.nc.jetstream(), self.subjects, replicas=replicas, queue=queue
        )
        self._reopener = Reopener(self.nc, self.subjects, self._reopened, replicas=replicas, queue=queue)
        self._reopener.start()
        self._fleet = FleetView(buckets.agents)
        await self._fleet.start()
        gid = self.settings.gateway_id  # not asked under a NATS identity: it may only read its replies
        if gid and not self.settings.nats_creds and await listened(self.nc, self.subjects.reply(gid, "-")):
            # both would take each other's answers for requests they never sent, and cancel them
            raise IdInUse(f"gateway id {gid!r} is in use: something listens on its replies (a running gateway; "
                          "or one on a host lost minutes ago, until NATS drops it; or a `nats sub` on them): "
                          "give this one another --gateway-id (CORRAL_GATEWAY_ID), or its own identity")  # fmt: skip
        self._transport = Transport(
            self.nc,
            self.subjects,
            claim_timeout=self.settings.claim_timeout_s,
            warm_claim_timeout=self.settings.warm_claim_timeout_s,
            idle_timeout=self.settings.idle_timeout_s,
            reply_buffer=self.settings.reply_buffer_bytes,
            tracer=self._tracer,
            members=self._fleet.knows,
            sender_id=self.settings.gateway_id,
        )
        await self._transport.start()
        self._fleet.on_gone(self._transport.agent_gone)  # its calls end now, not at the idle timeout
        self._policy = PolicyStore(buckets.policy)
        await self._policy.start()
        self._planner = Planner(
            self._transport,
            self._fleet,
            self.settings,
            router=self._router,
            sessions=Sessions(buckets.sessions) if self.settings.sessions else None,
            policy=self._policy,
        )
        if self.settings.auth == "keys":
            try:
                keys = await open_key_buckets(self.nc.jetstream(), self.subjects, replicas=replicas)
            except (TimeoutError, nats.errors.Error) as e:  # a create an identity may not make: no answer
                raise NatsRefused(
                    f"cannot open the API keys' buckets ({e!r}): JetStream did not answer, or, with NATS "
                    "identities, they do not exist yet and only the operator may make them: run `corral "
                    "status` (the setup step) or `corral keys create` with the operator's credentials first"
                ) from e
            access = Access(keys)
            await access.start()
            self._access = access
        self._batches = BatchRunner(
            self.nc,
            self.subjects,
            self._edge_http,
            access=self._access,
            limits=self._batch_limits,
            replicas=replicas,
        )
        await self._batches.start()
        self._rates_task = asyncio.create_task(
            supervise("rates watch", lambda: self._watch_rates(buckets.views), wake=self._rates_restart),
            name="rates-watch",
        )
        log.info("gateway ready: %d agents in the fleet", len(self._fleet.agents()))

    def _disconnected(self) -> None:
        if self._fleet is not None:  # the fleet as last seen, not emptied by a silence it cannot hear
            self._fleet.connection_lost()

    def _reconnected(self) -> None:
        """Back on NATS, maybe a restarted one that lost what it kept in memory: ensure the buckets
        and the queue stream again, then restart the watches (`_reopened`)."""
        if self._reopener is not None:
            self._reopener.request()

    def _reopened(self) -> None:
        if self._fleet is not None:
            self._fleet.restart()
        if self._access is not None:
            self._access.restart()
        if self._policy is not None:
            self._policy.restart()
        self._rates_restart.set()

    async def _watch_rates(self, kv: KeyValue) -> None:
        """Keep the aggregator's latest rates (the only part of /api/status it alone knows); a new
        watch whenever the buckets were opened again (see `_reconnected`)."""
        while True:
            try:
                await watch_until(lambda: self._watch_rates_once(kv), self._rates_restart)
            except (nats.errors.Error, TimeoutError) as e:
                if self._reopener is not None:
                    self._reopener.missing(e)
                raise

    async def _watch_rates_once(self, kv: KeyValue) -> None:
        snapshot = True
        async with watching(kv, views.RATES_KEY) as watcher:
            async for entry in watcher:
                if entry is None:
                    snapshot = False
                if entry is None or not entry.value or entry.operation in ("DEL", "PURGE"):
                    continue
                try:
                    self._rates = views.rates_decoder.decode(entry.value)
                except msgspec.DecodeError:
                    log.warning("ignoring undecodable rates in the views bucket")
                    continue
                self._rates_at = received_at(entry, snapshot=snapshot)
                self._rates_seen.set()

    @property
    def rates(self) -> views.Rates | None:
        """The aggregator's latest rolling figures; None until an aggregator has written them, or
        once it has stopped rewriting them (`corral.views.current`)."""
        return views.current(self._rates, time.monotonic() - self._rates_at)

    async def wait_rates(self, predicate: Callable[[views.Rates], bool], timeout: float) -> views.Rates:
        """Wait until the aggregator's figures satisfy ``predicate`` (woken by each KV update)."""
        async with asyncio.timeout(timeout):
            while self._rates is None or not predicate(self._rates):
                self._rates_seen.clear()
                await self._rates_seen.wait()
        return self._rates

    def begin_stop(self, grace_s: float) -> None:
        """The HTTP server is about to stop, cutting what is open after ``grace_s``: what is still
        running or queued a little before then ends in words (`corral.gateway.shutdown`)."""
        if self._planner is not None:
            self._planner.shutdown.begin(grace_s)

    async def stop(self) -> None:
        if self._planner is not None:
            self._planner.shutdown.cancel()
        if self._batches is not None:  # first: the lines it runs go back to the fleet at once
            await self._batches.stop()
        if self._reopener is not None:
            await self._reopener.stop()
        if self._rates_task is not None:
            await cancel_and_wait([self._rates_task])
        if self._access is not None:
            await self._access.stop()
        if self._planner is not None:
            await self._planner.stop()
            if self._planner.sessions is not None:
                await self._planner.sessions.close()
        if self._transport is not None:
            await self._transport.stop()
        if self._policy is not None:
            await self._policy.stop()
        if self._fleet is not None:
            await self._fleet.stop()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error):  # closed meanwhile: nothing left to drain
                await self.nc.drain()

    @property
    def edge(self) -> Edge:
        """The bounds every HTTP request meets (`corral.gateway.edge`)."""
        return self._edge

    @property
    def fleet(self) -> FleetView:
        assert self._fleet is not None, "gateway not started"
        return self._fleet

    @property
    def access(self) -> Access | None:
        """The API keys, limits and usage; None with keys off."""
        return self._access

    @property
    def policy(self) -> PolicyStore:
        """The fleet's model aliases and fallbacks, as this gateway last heard them."""
        assert self._policy is not None, "gateway not started"
        return self._policy

    @property
    def batches(self) -> BatchRunner:
        """The Batch API's runner and store (`corral.gateway.batch`)."""
        assert self._batches is not None, "gateway not started"
        return self._batches

    @property
    def planner(self) -> Planner:
        assert self._planner is not None, "gateway not started"
        return self._planner

    # -- ASGI --------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._gate.serve(scope, receive, send, self._gated)
        else:
            await self.app(scope, receive, send)

    async def _gated(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._access is not None:
            await self._access.serve(scope, receive, send, self._edge_http)
        else:
            await self._edge.serve(scope, receive, send, self._http)

    async def _edge_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._edge.serve(scope, receive, send, self._http)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path in MODEL_ENDPOINTS:
            if scope["method"] == "POST":
                await self._model_request(scope, receive, send)
            else:  # gin's answer to a known path and another method
                await plain(send, 405, METHOD_NOT_ALLOWED.encode(), [(b"allow", b"POST")])
        else:  # the app's routes, and gin's 404, 405 and trailing-slash redirects (`routes.http_error`)
            await self.app(scope, receive, send)

    async def _model_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint: str = scope["path"]
        with server_span(self._tracer, f"POST {endpoint}", trace_carrier(scope["headers"])) as span:
            if not span.is_recording():
                await self._model_call(span, scope, receive, send)
                return
            sent = Sent(send)  # the status it answers, for the span (a stream's body writes go around it)
            try:
                await self._model_call(span, scope, receive, sent)
            finally:
                set_http_status(span, sent.status)

    async def _model_call(self, span: Span, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint: str = scope["path"]
        api = dialect(endpoint)
        body: bytes = scope[BODY]
        if not body or body.isspace():  # no copy of a large body
            # /v1 gives Go's decoder's own error for no JSON value, the native API its own words
            empty = BadRequest("missing request body" if api == "ollama" else "EOF")
            await respond_error(send, empty, api=api)
            return
        key = key_of(scope)
        try:
            view, body = bodies.read_view(body)
        except RecursionError:  # Go's decoder refuses such a body too
            await respond_error(send, BadRequest(TOO_DEEP), api=api)
            return
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            if key is not None and key.models:  # its model cannot be checked: it goes nowhere
                await respond_error(send, BadRequest(f"invalid request body: {e}"), api=api)
                return
            # let an Ollama word the error exactly as it would
            await relay(self.planner, WorkRequest(endpoint=endpoint, body=body), receive, send, api=api)
            return
        try:
            work, raw = self._route(endpoint, body, view, scope["headers"], key)
        except CorralError as e:
            await respond_error(send, e, api=api, endpoint=endpoint)
            return
        label = ""  # its model as a metrics label, and in usage: worked out once, here
        if work.model is not None:
            if key is not None and not model_allowed(key.models, work.model.display):
                # outside the key's allow-list: exactly what a model no agent has answers
                err = ModelNotFound(work.model.display)
                await respond_error(send, err, api=api, endpoint=endpoint, raw_model=raw)
                return
            if key is not None:
                work.allowed = key.models  # and no fallback outside it serves it
            # usage is kept per model: a name no agent has is "other", so a client sending
            # made-up names cannot fill the usage bucket with rows of its own
            k = work.model.key  # a model only lately silent agents hold may yet be served
            label = known_label(k, self.fleet.has_model(k) or bool(self.fleet.lately_silent_with(k)))
            scope[MODEL] = work.model.display if label != OTHER else OTHER
            set_model(span, endpoint, work.model.display)
        elif key is not None and key.models:
            await respond_error(send, ModelNotFound(f"model '{raw}' not found"), api=api)
            return
        if work.expires_now and key is not None and key.role != "admin":
            # a keep_alive under a second ends the runner with this request (or a moment
            # after it), with nothing to run or not: other users' warm runner too
            refused = Forbidden("forbidden: keep_alive under a second (unloading a model) needs an admin key")
            await respond_error(send, refused, api=api, endpoint=endpoint)
            return
        if bodies.is_unload(endpoint, view):
            await management.unload(self.planner, work, raw, receive, send)
            return
        await relay(self.planner, work, receive, send, api=api, raw_model=raw, model_label=label)

    def _route(
        self,
        endpoint: str,
        body: bytes,
        view: bodies.RouteView,
        headers: list[tuple[bytes, bytes]],
        key: ApiKey | None,
    ) -> tuple[WorkRequest, str]:
        raw = view.model or ""
        if not raw and endpoint in ("/api/generate", "/api/embed"):
            raise ModelNotFound("model '' not found")
        vendor, strict, strategy, session, priority = None, False, None, None, None
        for k, v in headers:
            if k == STRATEGY_HEADER:
                try:
                    strategy, vendor = parse_strategy(_text(k, v))
                except ValueError as e:
                    raise BadRequest(str(e)) from None
            elif k == ENFORCE_HEADER:
                strict = _text(k, v).lower() in ("1", "true", "yes")
            elif k == SESSION_HEADER and v.strip():
                session = _text(k, v).strip()
            elif k == PRIORITY_HEADER:
                priority = parse_priority(_text(k, v))
        work = model_work(endpoint, body, raw, vendor=vendor, strict=strict, strategy=strategy)
        bodies.derive(work, view)
        work.priority = capped(priority, key.priority if key is not None else INTERACTIVE)
        if session is not None:  # the client names its conversation: every turn after the first follows
            work.session = "h." + hashlib.blake2b(session.encode(), digest_size=12).hexdigest()
            work.follow_up = True
        return work, raw
