"""What the aggregator alone hears, for Prometheus (``--metrics-port``): every agent's finished
requests (``events.request``), whichever gateway or direct NATS client sent them, with the agents'
own measures — time to first token and duration at the agent, tokens by Ollama's counts. One
aggregator's figures are the fleet's; with several, read one (they hear the same events).

Label values are bounded: a model is its normalised name while some agent of the fleet has it
(else ``other``), and agents are the fleet's.
"""

from __future__ import annotations

from typing import Final

from corral.protocol.messages import RequestFinished
from corral.runtime.fleet import FleetView
from prometheus_client import CollectorRegistry, Counter, Histogram

OTHER: Final = "other"
TTFT_BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DURATION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class AggregatorMetrics:
    """The series of one aggregator, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "corral_aggregator_requests",
            "Model requests the agents finished, by model, agent and Ollama's HTTP status",
            ["model", "agent", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "corral_aggregator_prompt_tokens",
            "Prompt tokens Ollama evaluated",
            ["model", "agent"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "corral_aggregator_generated_tokens", "Tokens Ollama generated", ["model", "agent"], registry=r
        )
        self.ttft = Histogram(
            "corral_aggregator_time_to_first_token_seconds",
            "Successful requests: from the agent taking it to Ollama's first byte",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "corral_aggregator_request_duration_seconds",
            "Requests at the agent: from taking it to its last byte",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )

    def finished(self, event: RequestFinished, fleet: FleetView) -> None:
        model = event.model if fleet.with_model(event.model) else OTHER
        agent = event.agent if fleet.knows(event.agent) else OTHER
        self.requests.labels(model, agent, str(event.status)).inc()
        self.duration.labels(model).observe(event.duration_ms / 1000)
        if event.ttft_ms is not None and 200 <= event.status < 300:
            self.ttft.labels(model).observe(event.ttft_ms / 1000)
        if event.prompt_eval_count:
            self.prompt_tokens.labels(model, agent).inc(event.prompt_eval_count)
        if event.eval_count:
            self.generated_tokens.labels(model, agent).inc(event.eval_count)
