"""What the gateway's SERVER span learns from a relayed answer: `record_answer`."""

from __future__ import annotations

import time

from corral.gateway.access import reply_tokens
from corral.gateway.metrics import Decision
from corral.runtime.telemetry import CORRAL_AGENT, CORRAL_ROUTE, failed, set_usage
from opentelemetry import trace


def record_answer(decision: Decision, agent: str) -> None:
    """Put on the current span (the request's SERVER span) how the request was routed, the agent
    that answered, the time from routing to the first body bytes sent (a body sent whole: to its
    end) and the token counts at the answer's end, all as the relay's `Decision` recorded them; an
    answer cut short by an error line marks the span failed."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    if decision.cut:  # its status went out as a success; the error line after it is what the client got
        failed(span, decision.cut, "the answer began, then ended with an error line")
    if not agent:  # no answer began: routed nowhere
        return
    if decision.route:
        span.set_attribute(CORRAL_ROUTE, decision.route)
    span.set_attribute(CORRAL_AGENT, agent)
    first = decision.first_byte if decision.first_byte is not None else time.perf_counter()
    prompt, generated = reply_tokens(decision.tail)
    set_usage(span, prompt=prompt, generated=generated, ttft_ms=(first - decision.started) * 1000)
