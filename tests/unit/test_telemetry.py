"""Trace context across NATS headers, messaging span names, and tracing off by default."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence

import pytest
from corral.runtime.telemetry import (
    client_span,
    extract_context,
    inject_headers,
    process_span,
    publish_span,
    recording,
    server_span,
    setup_tracing,
    tracer,
)
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

TEMPLATE = "corral.work.{vendor}.{model}"
SUBJECT = "corral.work.nvidia.llama3=2E2=3Alatest"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(autouse=True)
def unconfigured_global_tracing() -> Iterator[None]:
    """Every test starts and ends with OTel's global provider unset (it can be set once only)."""
    saved = (trace._TRACER_PROVIDER_SET_ONCE, trace._TRACER_PROVIDER)
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    try:
        yield
    finally:
        installed = trace._TRACER_PROVIDER
        trace._TRACER_PROVIDER_SET_ONCE, trace._TRACER_PROVIDER = saved
        if isinstance(installed, TracerProvider):
            installed.shutdown()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = setup_tracing("corral-test", endpoint=None, exporter=exporter, set_global=False)
    assert provider is not None
    yield provider
    provider.shutdown()


def by_name(spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def test_consumer_continues_the_producers_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    t = tracer("test", provider)
    headers = {"Corral-Request": "r1"}
    with publish_span(TEMPLATE, SUBJECT, headers, tracer=t):
        pass
    assert set(headers) == {"Corral-Request", "traceparent"}

    def other_side() -> None:  # a fresh contextvars context: only the headers cross over
        assert not trace.get_current_span().get_span_context().is_valid
        with process_span(TEMPLATE, SUBJECT, headers, tracer=t):
            pass

    contextvars.Context().run(other_side)

    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {f"{TEMPLATE} publish", f"{TEMPLATE} process"}
    producer, consumer = spans[f"{TEMPLATE} publish"], spans[f"{TEMPLATE} process"]
    assert producer.kind is SpanKind.PRODUCER
    assert consumer.kind is SpanKind.CONSUMER
    assert producer.context is not None and consumer.context is not None
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.parent.is_remote
    assert producer.parent is None
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == (
        "00",
        f"{producer.context.trace_id:032x}",
        f"{producer.context.span_id:016x}",
    )
    assert int(flags, 16) & 0x01, "sampled"
    assert dict(producer.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.destination.name": SUBJECT,
        "messaging.destination.template": TEMPLATE,
        "messaging.operation.name": "publish",
        "messaging.operation.type": "send",
    }
    assert dict(consumer.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.destination.name": SUBJECT,
        "messaging.destination.template": TEMPLATE,
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
    }
    assert producer.resource.attributes["service.name"] == "corral-test"


def test_producer_is_a_child_of_the_current_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    t = tracer("test", provider)
    headers: dict[str, str] = {}
    with (
        t.start_as_current_span("POST /api/chat", kind=SpanKind.SERVER) as server,
        publish_span(TEMPLATE, SUBJECT, headers, tracer=t, attributes={"messaging.message.id": "r1"}),
    ):
        pass
    producer = by_name(exporter.get_finished_spans())[f"{TEMPLATE} publish"]
    assert producer.parent is not None
    assert producer.parent.span_id == server.get_span_context().span_id
    assert producer.attributes is not None
    assert producer.attributes["messaging.message.id"] == "r1"


def test_upstream_trace_state_crosses_too(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    t = tracer("test", provider)
    incoming = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"}
    outgoing: dict[str, str] = {}
    with process_span(TEMPLATE, SUBJECT, incoming, tracer=t):
        inject_headers(outgoing)
    consumer = exporter.get_finished_spans()[0]
    assert consumer.context is not None
    assert f"{consumer.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert outgoing["tracestate"] == "vendor=abc"
    assert outgoing["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


def test_consumer_without_headers_starts_a_new_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    t = tracer("test", provider)
    with t.start_as_current_span("unrelated"), process_span(TEMPLATE, SUBJECT, None, tracer=t):
        pass
    consumer = by_name(exporter.get_finished_spans())[f"{TEMPLATE} process"]
    assert consumer.parent is None, "a message without context never joins whatever is current"


def test_a_failing_handler_marks_its_span(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    t = tracer("test", provider)
    with pytest.raises(RuntimeError), process_span(TEMPLATE, SUBJECT, {}, tracer=t):
        raise RuntimeError("ollama went away")
    [consumer] = exporter.get_finished_spans()
    assert consumer.status.status_code is StatusCode.ERROR
    assert [e.name for e in consumer.events] == ["exception"]


def test_extract_without_context() -> None:
    for headers in (None, {}, {"traceparent": "garbage"}):
        assert not trace.get_current_span(extract_context(headers)).get_span_context().is_valid


# -- tracing off -----------------------------------------------------------------------------
def test_setup_without_endpoint_is_off() -> None:
    assert setup_tracing("corral-test", endpoint=None) is None
    assert setup_tracing("corral-test", endpoint="") is None
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def test_noop_tracer_adds_no_traceparent() -> None:
    headers: dict[str, str] = {}
    with publish_span(TEMPLATE, SUBJECT, headers) as span:
        assert not span.is_recording()
    assert headers == {}


def test_noop_tracer_passes_upstream_context_through_unchanged() -> None:
    """OTel's no-op tracer keeps the remote parent, so an untraced agent relays it verbatim."""
    outgoing: dict[str, str] = {}
    with process_span(TEMPLATE, SUBJECT, {"traceparent": TRACEPARENT}) as span:
        assert not span.is_recording()
        inject_headers(outgoing)
    assert outgoing == {"traceparent": TRACEPARENT}


def test_tracing_off_server_and_client_spans_relay_an_incoming_trace_only() -> None:
    t = tracer("gateway")
    assert not recording(t)
    with server_span(t, "POST /api/chat", {}):
        with client_span(t, "POST /api/chat") as span:
            assert not span.is_recording() and not span.get_span_context().is_valid
        headers: dict[str, str] = {}
        with publish_span(TEMPLATE, SUBJECT, headers, tracer=t):
            pass
        assert headers == {}  # nothing came in, nothing goes out
    with server_span(t, "POST /api/chat", {"traceparent": TRACEPARENT}):
        headers = {}
        with publish_span(TEMPLATE, SUBJECT, headers, tracer=t):
            pass
        assert headers == {"traceparent": TRACEPARENT}  # the client's trace goes on, unrecorded


def test_a_tracer_made_before_the_global_provider_records_once_it_is_set(
    exporter: InMemorySpanExporter,
) -> None:
    early = tracer("made-at-import")
    assert not recording(early)
    setup_tracing("corral-gateway", endpoint=None, exporter=exporter)
    assert recording(early)
    with server_span(early, "POST /api/generate", {}):
        with client_span(early, "POST /api/generate") as span:
            assert span.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["POST /api/generate"] * 2


# -- global setup, as __main__ does it ------------------------------------------------------
def test_setup_installs_the_global_provider(exporter: InMemorySpanExporter) -> None:
    provider = setup_tracing("corral-agent", endpoint=None, exporter=exporter)
    assert trace.get_tracer_provider() is provider
    headers: dict[str, str] = {}
    with publish_span(TEMPLATE, SUBJECT, headers):  # library code: the global tracer
        pass
    assert "traceparent" in headers
    assert [s.name for s in exporter.get_finished_spans()] == [f"{TEMPLATE} publish"]


class RecordingOtlpExporter(SpanExporter):
    endpoints: list[str | None] = []

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoints.append(endpoint)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


@pytest.mark.parametrize(
    "endpoint",
    ["http://collector:4318", "http://collector:4318/", "http://collector:4318/v1/traces"],
)
def test_endpoint_uses_otlp_http_in_batches(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.http import trace_exporter

    monkeypatch.setattr(RecordingOtlpExporter, "endpoints", [])
    monkeypatch.setattr(trace_exporter, "OTLPSpanExporter", RecordingOtlpExporter)
    provider = setup_tracing("corral-gateway", endpoint=endpoint, set_global=False)
    assert provider is not None
    try:
        assert RecordingOtlpExporter.endpoints == ["http://collector:4318/v1/traces"]
        processors = provider._active_span_processor._span_processors
        assert [type(p) for p in processors] == [BatchSpanProcessor]
    finally:
        provider.shutdown()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
