"""OpenTelemetry for Corral: W3C trace context in NATS headers, messaging spans, SDK setup.

Library code only calls `tracer`, `publish_span`, `process_span`, `server_span`, `client_span`,
`inject_headers` and `extract_context`. With no SDK configured the span helpers skip
OpenTelemetry altogether (its no-op spans still cost ~25 µs each here, several per request on
the hot path) unless a trace context came in, which they pass on unchanged. Only a process entry
point (``__main__``) calls `setup_tracing`, once, and shuts the returned provider down on exit so
batched spans are flushed.

A request's trace::

    gateway SERVER "POST /api/chat"
      └─ PRODUCER "corral.work.{vendor}.{model} publish"     context → traceparent/tracestate headers
           └─ agent CONSUMER "corral.work.{vendor}.{model} process"   context ← headers
                └─ CLIENT call to Ollama

Span names come from low-cardinality subject *templates* (as faststream names its spans
``"{destination} {action}"``); the concrete subject goes into ``messaging.destination.name``.

What a request was and what it cost are attributes, named after OpenTelemetry's generative-AI
semantic conventions (https://opentelemetry.io/docs/specs/semconv/gen-ai/) where they have a name:
the gateway's SERVER span and the agent's CLIENT span carry ``gen_ai.request.model``,
``gen_ai.operation.name``, ``gen_ai.usage.input_tokens`` / ``gen_ai.usage.output_tokens`` (read
from the end of the answer) and ``corral.ttft_ms`` (each measured where it is: the gateway's from
its routing to the first bytes sent, the agent's from its call to Ollama's); the gateway's also
``corral.agent``, the agent that served it, ``corral.route``, how it was routed, and
``http.response.status_code``; a 5xx answer, or an answer that began and then ended with an error
line, marks it failed (status ERROR, ``error.type`` the status it ended as). A PRODUCER
span lasts from the publish until the agent's head or the attempt's failure, so an attempt that
failed over is an error span of its own, with ``corral.agent`` when an agent had claimed it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Final

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

logger = logging.getLogger(__name__)

OTLP_TRACES_PATH: Final = "/v1/traces"

MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_DESTINATION_NAME: Final = "messaging.destination.name"
MESSAGING_DESTINATION_TEMPLATE: Final = "messaging.destination.template"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
NATS: Final = "nats"

GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
ERROR_TYPE: Final = "error.type"
CORRAL_AGENT: Final = "corral.agent"  # the agent id that served (or claimed) the request
CORRAL_TTFT_MS: Final = "corral.ttft_ms"  # milliseconds until the answer's first bytes
CORRAL_ROUTE: Final = "corral.route"  # how the gateway routed it (warm, load, queue, direct ...)
CORRAL_OUTCOME: Final = "corral.outcome"  # why an attempt did not begin a reply (busy, failed ...)

_OPERATIONS: Final = {
    "/api/chat": "chat",
    "/v1/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
    "/api/generate": "text_completion",
    "/v1/completions": "text_completion",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
    "/v1/embeddings": "embeddings",
}


def setup_tracing(
    service_name: str,
    *,
    endpoint: str | None,
    exporter: SpanExporter | None = None,
    set_global: bool = True,
) -> TracerProvider | None:
    """Configure the SDK for this process; None (the no-op tracer stays) when there is nowhere to send.

    ``endpoint`` is an OTLP/HTTP collector (``http://collector:4318``; ``/v1/traces`` is appended
    when missing); spans go through a `BatchSpanProcessor`. An explicit ``exporter`` (tests pass an
    ``InMemorySpanExporter``) takes its place, through a `SimpleSpanProcessor`. OpenTelemetry lets
    a process set its global provider only once, so tests pass ``set_global=False`` and use the
    returned provider through `tracer` (``tracer(name, provider)``) and the span helpers.
    """
    if exporter is not None:
        processor: SpanProcessor = SimpleSpanProcessor(exporter)
    elif endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        url = endpoint.rstrip("/")
        if not url.endswith(OTLP_TRACES_PATH):
            url += OTLP_TRACES_PATH
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=url))
        logger.info("tracing %s to %s", service_name, url)
    else:
        logger.debug("tracing off for %s: no OTLP endpoint configured", service_name)
        return None
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(processor)
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def tracer(name: str, provider: trace.TracerProvider | None = None) -> Tracer:
    """``trace.get_tracer(name)``: the global provider's (no-op until configured) unless one is given."""
    return trace.get_tracer(name, tracer_provider=provider)


def recording(t: Tracer) -> bool:
    """Whether spans from ``t`` are recorded: an SDK provider is behind it, given or set globally."""
    if isinstance(t, trace.NoOpTracer):
        return False
    if isinstance(t, trace.ProxyTracer):  # follows the global provider, which may be set later
        return not isinstance(
            trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
        )
    return True


def _traced() -> bool:
    """A valid span context is current (a trace came in, or a span of ours is open)."""
    return trace.get_current_span().get_span_context().is_valid


@contextmanager
def server_span(t: Tracer, name: str, carrier: Mapping[str, str]) -> Iterator[Span]:
    """A SERVER span ``name`` continuing the trace in ``carrier`` (the HTTP request's traceparent)."""
    if not carrier and not recording(t):
        yield trace.INVALID_SPAN
        return
    with t.start_as_current_span(name, kind=SpanKind.SERVER, context=extract_context(carrier)) as span:
        yield span


@contextmanager
def client_span(t: Tracer, name: str) -> Iterator[Span]:
    """A CLIENT span ``name`` (a call to a backend) under the current span."""
    if not recording(t) and not _traced():
        yield trace.INVALID_SPAN
        return
    with t.start_as_current_span(name, kind=SpanKind.CLIENT) as span:
        yield span


def set_http_status(span: Span, status: int) -> None:
    """Put on a SERVER span the HTTP status it answered (none: its client left first). A 5xx marks
    it failed, as OpenTelemetry's HTTP conventions have it; a 4xx is the client's error, not ours."""
    if not status or not span.is_recording():
        return
    span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
    if status >= 500:
        failed(span, status, f"answered {status}")


def failed(span: Span, status: int, why: str) -> None:
    """Mark ``span`` failed with the HTTP status its request ended as (``error.type``)."""
    span.set_attribute(ERROR_TYPE, str(status))
    span.set_status(StatusCode.ERROR, why)


def set_model(span: Span, endpoint: str, model: str) -> None:
    """Name on ``span`` the model a request asked for and what it does with it (chat, ...)."""
    if not span.is_recording():
        return
    span.set_attribute(GEN_AI_REQUEST_MODEL, model)
    if operation := _OPERATIONS.get(endpoint):
        span.set_attribute(GEN_AI_OPERATION_NAME, operation)


def set_usage(span: Span, *, prompt: int, generated: int, ttft_ms: float | None) -> None:
    """Set on ``span`` an answer's token counts (none when it said none) and the time to its first
    bytes."""
    if not span.is_recording():
        return
    if ttft_ms is not None:
        span.set_attribute(CORRAL_TTFT_MS, round(ttft_ms, 3))
    if generated or prompt:
        span.set_attribute(GEN_AI_USAGE_INPUT_TOKENS, prompt)
        span.set_attribute(GEN_AI_USAGE_OUTPUT_TOKENS, generated)


def attempted(span: Span, agent: str | None, outcome: str = "", *, failed: bool = False) -> None:
    """Mark a PRODUCER span with how its attempt went: the agent that claimed it and, when the
    attempt did not begin a reply, why (``outcome``: busy, no responders, failed); a ``failed``
    attempt (claimed and then silent or failing, or not claimed in time) is an error."""
    if not span.is_recording():
        return
    if agent:
        span.set_attribute(CORRAL_AGENT, agent)
    if outcome:
        span.set_attribute(CORRAL_OUTCOME, outcome)
    if failed:
        span.set_status(StatusCode.ERROR, "the attempt failed before the answer began")


def inject_headers(headers: dict[str, str], context: Context | None = None) -> None:
    """Add the current (or the given) span context to NATS headers as W3C traceparent/tracestate.

    Adds nothing when there is no valid span context, e.g. tracing is off and nothing upstream
    sent a traceparent.
    """
    propagate.inject(headers, context=context)


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The remote context carried in NATS headers; an empty `Context` when there is none."""
    return propagate.extract(headers or {}, context=Context())


def _attributes(
    template: str,
    subject: str,
    operation: str,
    operation_type: str,
    extra: Mapping[str, AttributeValue] | None,
) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        MESSAGING_SYSTEM: NATS,
        MESSAGING_DESTINATION_NAME: subject,
        MESSAGING_DESTINATION_TEMPLATE: template,
        MESSAGING_OPERATION_NAME: operation,
        MESSAGING_OPERATION_TYPE: operation_type,
    }
    if extra:
        attributes.update(extra)
    return attributes


@contextmanager
def publish_span(
    template: str,
    subject: str,
    headers: dict[str, str],
    *,
    tracer: Tracer | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Iterator[Span]:
    """A PRODUCER span ``"{template} publish"`` around a publish; injects its context into headers.

    ``template`` is the low-cardinality subject template (``corral.work.{vendor}.{model}``),
    ``subject`` the concrete subject. Build ``headers`` before entering and publish inside.
    """
    t = tracer if tracer is not None else trace.get_tracer(__name__)
    if not recording(t):
        if _traced():
            inject_headers(headers)  # not ours to record, but the trace goes on
        yield trace.INVALID_SPAN
        return
    with t.start_as_current_span(
        f"{template} publish",
        kind=SpanKind.PRODUCER,
        attributes=_attributes(template, subject, "publish", "send", attributes),
    ) as span:
        inject_headers(headers)
        yield span


@contextmanager
def process_span(
    template: str,
    subject: str,
    headers: Mapping[str, str] | None,
    *,
    tracer: Tracer | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Iterator[Span]:
    """A CONSUMER span ``"{template} process"`` whose parent is the context in the message headers."""
    t = tracer if tracer is not None else trace.get_tracer(__name__)
    if not recording(t) and not (headers and "traceparent" in headers):
        yield trace.INVALID_SPAN
        return
    with t.start_as_current_span(
        f"{template} process",
        context=extract_context(headers),
        kind=SpanKind.CONSUMER,
        attributes=_attributes(template, subject, "process", "process", attributes),
    ) as span:
        yield span
