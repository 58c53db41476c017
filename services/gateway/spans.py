"""What the gateway's SERVER span learns from a relayed answer: `record_answer`."""

from __future__ import annotations

import time

from corral.gateway.access import reply_tokens
from corral.gateway.metrics import Decision
from corral.runtime.telemetry import CORRAL_AGENT, CORRAL_ROUTE, set_usage
from opentelemetry import trace


def record_answer(decision: Decision, agent: str) -> None:
    """Put on the current span (the request's SERVER span) how the request was routed, the agent
    that answered, the time from routing to the first body bytes sent (a body sent whole: to its
    end) and the token counts at the answer's end, all as the relay's `Decision` recorded them."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    if decision.route:
        span.set_attribute(CORRAL_ROUTE, decision.route)
    if not agent:  # no answer began
        return
    span.set_attribute(CORRAL_AGENT, agent)
    first = decision.first_byte if decision.first_byte is not None else time.perf_counter()
    prompt, generated = reply_tokens(decision.tail)
    set_usage(span, prompt=prompt, generated=generated, ttft_ms=(first - decision.started) * 1000)
