"""One request, one trace: gateway SERVER → PRODUCER publish → agent CONSUMER → CLIENT call to Ollama."""

from __future__ import annotations

import ollama
import pytest
from corral.runtime.natsserver import NatsServer
from corral.runtime.telemetry import setup_tracing
from corral.up import FleetOptions, LocalFleet, default_sims
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

pytestmark = pytest.mark.integration


async def test_spans_of_one_request_form_one_trace(nats_server: NatsServer, root: str) -> None:
    exporter = InMemorySpanExporter()
    provider = setup_tracing("corral-test", endpoint=None, exporter=exporter, set_global=False)
    assert provider is not None
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=0.01),
        tracer_provider=provider,
    )
    async with LocalFleet(options) as fleet:
        exporter.clear()
        async with ollama.AsyncClient(host=fleet.url) as client:
            r = await client.generate(model="llama3.2", prompt="trace me")
        assert r.done
    spans = exporter.get_finished_spans()
    by_kind = {k: [s for s in spans if s.kind == k] for k in SpanKind}
    server = next(s for s in by_kind[SpanKind.SERVER] if s.name == "POST /api/generate")
    producers = [s for s in by_kind[SpanKind.PRODUCER] if s.context.trace_id == server.context.trace_id]
    consumer = next(s for s in by_kind[SpanKind.CONSUMER] if s.context.trace_id == server.context.trace_id)
    client = next(s for s in by_kind[SpanKind.CLIENT] if s.context.trace_id == server.context.trace_id)
    # the chain crosses the NATS hop: the agent's consumer span is a child of a gateway publish
    assert consumer.parent is not None and consumer.parent.span_id in {p.context.span_id for p in producers}
    assert all(p.parent is not None and p.parent.span_id == server.context.span_id for p in producers)
    assert client.parent is not None and client.parent.span_id == consumer.context.span_id
    assert consumer.name == f"{root}.agent.{{id}}.work process"  # cold model: sent to one agent directly
    assert client.name == "POST /api/generate"
    provider.shutdown()
