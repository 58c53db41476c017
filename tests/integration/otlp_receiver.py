"""An OTLP/HTTP trace receiver for tests: what a collector would get from Corral's processes.

It accepts ``POST /v1/traces`` with ``application/x-protobuf`` bodies (gzip or not), decodes each
``ExportTraceServiceRequest`` with the OpenTelemetry proto package, answers 200 with an empty
``ExportTraceServiceResponse`` and keeps every span with its resource's ``service.name``. Tests
wait on arrivals (`OtlpReceiver.wait_for`), never on a sleep.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

PROTOBUF = "application/x-protobuf"

# OTLP's span kinds and status codes by name (the proto enums' names without their prefix)
KINDS = {v: k.removeprefix("SPAN_KIND_") for k, v in Span.SpanKind.items()}
STATUSES = {v: k.removeprefix("STATUS_CODE_") for k, v in Status.StatusCode.items()}


def _value(v: AnyValue) -> Any:
    match v.WhichOneof("value"):
        case "string_value":
            return v.string_value
        case "bool_value":
            return v.bool_value
        case "int_value":
            return v.int_value
        case "double_value":
            return v.double_value
        case "array_value":
            return [_value(x) for x in v.array_value.values]
        case "bytes_value":
            return v.bytes_value
        case _:
            return None


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived: ids as hex, kind (``SERVER``, ``PRODUCER`` ...) and status code
    (``UNSET``, ``OK``, ``ERROR``) by name."""

    service: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    kind: str
    name: str
    status: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


class OtlpReceiver:
    """``async with OtlpReceiver() as r``: ``r.url`` is what ``--otlp-endpoint`` takes."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        if request.content_type != PROTOBUF:
            return web.Response(status=415, text=f"expected {PROTOBUF}")
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "").lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            export = ExportTraceServiceRequest.FromString(body)
        except (OSError, EOFError, zlib.error, DecodeError) as e:
            return web.Response(status=400, text=f"undecodable export: {e}")
        async with self._arrived:
            self.requests += 1
            self.spans.extend(_spans(export))
            self._arrived.notify_all()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type=PROTOBUF)

    async def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """Wait (woken by each export) until ``predicate(spans)`` holds; the spans then."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: predicate(self.spans))
            return list(self.spans)

    async def wait_trace(self, trace_id: str, count: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """Wait until at least ``count`` spans of ``trace_id`` have arrived; those spans."""
        spans = await self.wait_for(lambda s: sum(x.trace_id == trace_id for x in s) >= count, timeout)
        return [s for s in spans if s.trace_id == trace_id]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]


def _span(service: str, s: Span) -> ReceivedSpan:
    return ReceivedSpan(
        service=service,
        trace_id=s.trace_id.hex(),
        span_id=s.span_id.hex(),
        parent_id=s.parent_span_id.hex(),
        kind=KINDS.get(s.kind, str(s.kind)),
        name=s.name,
        status=STATUSES.get(s.status.code, str(s.status.code)),
        start_ns=s.start_time_unix_nano,
        end_ns=s.end_time_unix_nano,
        attributes={a.key: _value(a.value) for a in s.attributes},
    )


def _spans(export: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out = []
    for rs in export.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        service = str(resource.get("service.name", ""))
        for ss in rs.scope_spans:
            out.extend(_span(service, s) for s in ss.spans)
    return out
