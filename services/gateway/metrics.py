"""The gateway's Prometheus series (``GET /metrics``), in the text format of
https://prometheus.io/docs/instrumenting/exposition_formats/.

Two kinds of series, so that several gateways add up correctly:

- **this gateway's own requests** (`GatewayMetrics`): requests, latencies, tokens, queue waits,
  routing decisions, claim retries and failovers, each updated once when a request ends (never per
  chunk). Summed over gateways they give the fleet's traffic.
- **the fleet** (`corral.gateway.fleetmetrics`): agents, VRAM, slots and the fleet-wide queue,
  computed at scrape time from the shared state (the agents bucket and the queue stream), so every
  gateway reports the same values: take ``max`` (or one gateway's), never ``sum``, over gateways.

Label values are bounded: a model is its normalised name only while some agent of the fleet has it
(else ``other``), an endpoint is one of Ollama's routes (else ``other``), agents are the fleet's,
and a route is one of `ROUTES` or a strategy name.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from corral import views
from corral.gateway.access import reply_tokens
from corral.gateway.fleetmetrics import FleetCollector
from corral.protocol.endpoints import MODEL_ENDPOINTS
from corral.protocol.errors import CorralError
from corral.protocol.subjects import Subjects
from corral.routing import Route, expected_waits
from corral.runtime.fleet import FleetView
from corral.runtime.workqueue import depths
from corral.transport import WorkRequest
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

OTHER: Final = "other"  # the label of a model no agent has, or of an endpoint Ollama does not serve
NONE: Final = "none"  # no model (management, views) or no agent (answered before one took it)

# why a request went where it went (the X-Corral-Route header and the decisions counter)
SESSION: Final = "session"  # the agent holding the conversation's prompt cache
WARM: Final = "warm"  # an agent with the model loaded and a free slot
LOAD: Final = "load"  # the agent chosen to load a cold model (one load per model, fleet-wide)
QUEUED: Final = "queued"  # waited for a slot: the fleet-wide queue, or at the agent whose runner will match
DIRECT: Final = "direct"  # sent to one agent the call names (management: show, create, blobs, pull, unload)
ROUTES: Final = (SESSION, WARM, LOAD, QUEUED, DIRECT)  # else the strategy's name (round_robin, ...)

# seconds; LLM calls run from tens of milliseconds (an embed, a warm first token) to minutes
TTFT_BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DURATION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS: Final = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

ENDPOINTS: Final = MODEL_ENDPOINTS | {
    "/api/show",
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/blobs",
    "/api/tags",
    "/api/ps",
    "/api/version",
    "/v1/models",
}
_STREAMING: Final = ("application/x-ndjson", "text/event-stream")


def endpoint_label(path: str) -> str:
    """An Ollama route as a label: a blob's digest dropped, anything unknown ``other``."""
    if path.startswith("/api/blobs/"):
        return "/api/blobs"
    return path if path in ENDPOINTS else OTHER


def streamed(content_type: str) -> bool:
    """Whether a reply of this content type streams (NDJSON, server-sent events)."""
    return content_type.startswith(_STREAMING)


@dataclass(slots=True)
class Decision:
    """One request's route, filled in as it goes: the planner says where and why, the relay when
    the first byte went out; both read back into the response's headers and `GatewayMetrics`."""

    started: float  # time.perf_counter() when the gateway began routing it
    strategy: str = ""
    route: str = ""  # one of ROUTES, or the strategy's name; empty: not routed (an error)
    queue_s: float | None = None  # how long it waited for a slot, when it did
    first_byte: float | None = None  # perf_counter() when its first body byte went out, when streamed
    tail: bytes = b""  # the end of the reply's body (its token counts)
    served: str = ""  # the model that served a model call (its short display form)
    requested: str = ""  # with a substitution: the key of the model the client asked for
    substitution: str = ""  # alias, fallback or quant (`corral.gateway.policy`); empty: none
    model_label: str = ""  # the requested model as a label, once worked out (`GatewayMetrics.model_label`)
    stopped: bool = False  # the gateway's stop ended it: its client was told so (503 or a last error line)
    cut: int = 0  # a begun answer ended by an error line instead: that error's status
    failure: CorralError | None = None  # the last error an agent failed it with before its head
    direct_only: bool = False  # an agent failed it, or a breaker is open: only named agents are sent it

    def headers(self, agent: str) -> list[tuple[bytes, bytes]]:
        """``X-Corral-Agent``, ``X-Corral-Route``, ``X-Corral-Model`` (the model that served) and,
        after a wait, ``X-Corral-Queue-Ms``."""
        out = [(b"x-corral-agent", agent.encode())] if agent else []
        if self.served:
            out.append((b"x-corral-model", self.served.encode()))
        if self.route:
            out.append((b"x-corral-route", self.route.encode()))
        if self.queue_s is not None:
            out.append((b"x-corral-queue-ms", b"%d" % round(self.queue_s * 1000)))
        return out


def explain(
    req: WorkRequest, agent: str, decision: Decision, fleet: FleetView, outstanding: Mapping[str, int]
) -> str:
    """The debug line of one routed request: where it went, why, and the candidates' expected waits."""
    m = req.model
    route = None if m is None else Route(key=m.key, vendor=req.vendor, strict=req.strict, num_ctx=req.num_ctx)
    queued = "-" if decision.queue_s is None else f"{decision.queue_s:.3f}"
    waits = expected_waits(route, fleet.agents() if m is None else fleet.with_model(m.key), outstanding)
    return (
        f"{req.endpoint} {'-' if m is None else m.key} -> {agent} (route {decision.route}, strategy "
        f"{decision.strategy}, queued {queued} s); candidates (expected wait): {waits}"
    )


def known_label(key: str, known: bool) -> str:
    """Model ``key`` as a label: itself when some agent has it (``known``), else `OTHER`, so that
    clients sending made-up names add one label value, not one each."""
    return key if known else OTHER


def new_decision(model_label: str = "") -> Decision:
    return Decision(started=time.perf_counter(), model_label=model_label)


class GatewayMetrics:
    """This gateway's per-request series, in a registry of its own (several gateways in one process
    — tests, benchmarks — never share counts), plus the fleet's at scrape time (`scrape`)."""

    def __init__(self, fleet: FleetView) -> None:
        self._fleet = fleet
        # (series, label values) → its child: `labels()` validates and locks on every call, a dict
        # lookup does not; bounded like the label values themselves
        self._children: dict[tuple[Any, ...], Any] = {}
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "corral_gateway_requests",
            "Requests answered by this gateway, by model, endpoint, HTTP status and serving agent",
            ["model", "endpoint", "status", "agent"],
            registry=r,
        )
        self.ttft = Histogram(
            "corral_gateway_time_to_first_token_seconds",
            "Streamed requests: from routing to the first body byte sent to the client",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "corral_gateway_request_duration_seconds",
            "Requests an agent answered: from routing to the last body byte",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "corral_gateway_prompt_tokens",
            "Prompt tokens evaluated, from replies' counts",
            ["model", "agent"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "corral_gateway_generated_tokens",
            "Tokens generated, from replies' counts",
            ["model", "agent"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "corral_gateway_queue_wait_seconds",
            "Requests that waited for a slot: how long",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "corral_gateway_routing_decisions",
            "Routed requests by strategy and reason (warm, session, load, queued, direct, or the strategy)",
            ["strategy", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "corral_gateway_claim_retries",
            "Attempts that did not begin a reply and were tried elsewhere: busy, or failed (no claim, silent, error)",
            ["model", "reason"],
            registry=r,
        )
        self.substitutions = Counter(
            "corral_gateway_model_substitutions",
            "Requests served by another model than they named: by alias, fallback or quantisation",
            ["requested", "served", "kind"],
            registry=r,
        )
        self.failovers = Counter(
            "corral_gateway_failovers",
            "Requests served by another agent after one failed before answering",
            ["model"],
            registry=r,
        )
        self.nats_connected = Gauge(
            "corral_gateway_nats_connected",
            "1 while this gateway is connected to NATS, else 0 (the fleet series then show its last view)",
            registry=r,
        )

    def _child(self, series: Any, *labels: str) -> Any:
        key = (series, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = series.labels(*labels)
        return child

    def model_label(self, work: WorkRequest, decision: Decision | None = None) -> str:
        """The request's model as a label, bounded by what the fleet has: the one its ``decision``
        carries when the gateway worked it out already (`known_label`), else worked out now."""
        if decision is not None and decision.model_label:
            return decision.model_label
        if work.model is None:
            return NONE
        return self._key_label(work.model.key)

    def _key_label(self, key: str) -> str:
        return known_label(key, self._fleet.has_model(key))

    def _substituted(self, decision: Decision) -> None:
        """An alias or fallback names its model in the fleet's rules (a bounded set); a model a
        quantisation stood in for is any name a client sent, so ``other`` unless the fleet has it."""
        kind = decision.substitution
        requested = (
            decision.requested if kind in ("alias", "fallback") else self._key_label(decision.requested)
        )
        served = self._key_label(decision.served.lower())  # a display form's key
        self._child(self.substitutions, requested, served, kind).inc()

    def retried(self, work: WorkRequest, reason: str) -> None:
        self._child(self.retries, self.model_label(work), reason).inc()

    def failed_over(self, work: WorkRequest) -> None:
        self._child(self.failovers, self.model_label(work)).inc()

    def finished(self, work: WorkRequest, decision: Decision, status: int, agent: str) -> None:
        """One request ended (answered, failed or its client gone): every series it adds to, once."""
        now = time.perf_counter()
        model = self.model_label(work, decision)
        child = self._child
        child(self.requests, model, endpoint_label(work.endpoint), str(status), agent or NONE).inc()
        if decision.route:
            child(self.decisions, decision.strategy, decision.route).inc()
        if decision.queue_s is not None:
            child(self.queue_wait, model).observe(decision.queue_s)
        if not agent:
            return
        if decision.substitution:
            self._substituted(decision)
        child(self.duration, model).observe(now - decision.started)
        if decision.first_byte is not None:
            child(self.ttft, model).observe(decision.first_byte - decision.started)
        if status == 200 and decision.tail:
            prompt, generated = reply_tokens(decision.tail)
            if prompt:
                child(self.prompt_tokens, model, agent).inc(prompt)
            if generated:
                child(self.generated_tokens, model, agent).inc(generated)

    async def scrape(self, nc: NATS, subjects: Subjects) -> bytes:
        """The exposition text: this gateway's series, then the fleet's as the shared state says now."""
        self.nats_connected.set(1 if nc.is_connected else 0)
        queue = views.queue_by_model(await depths(nc, subjects))
        fleet = CollectorRegistry(auto_describe=False)
        fleet.register(FleetCollector(self._fleet.agents(), queue))
        return generate_latest(self.registry) + generate_latest(fleet)
