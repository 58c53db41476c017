"""What the gateway's SERVER span learns from an answer as it relays it: `AnswerSpan`."""

from __future__ import annotations

import time

from corral.gateway.access import TAIL_BYTES, reply_tokens
from corral.runtime.telemetry import CORRAL_AGENT, set_usage
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan


class AnswerSpan:
    """The current span (the request's SERVER span) gets the agent that answered, the time from
    the request's arrival (the span's start) to the answer's first bytes, and the token counts at
    the answer's end. Keeps nothing, and costs next to nothing, when that span is not recorded."""

    __slots__ = ("_span", "_tail", "_ttft_ms", "on")

    def __init__(self, agent: str) -> None:
        self._span = trace.get_current_span()
        self.on = self._span.is_recording()
        self._tail = b""
        self._ttft_ms: float | None = None
        if self.on and agent:
            self._span.set_attribute(CORRAL_AGENT, agent)

    def head(self, data: bytes) -> None:
        """The answer's first bytes go to the client now."""
        if not self.on:
            return
        if isinstance(self._span, ReadableSpan) and self._span.start_time is not None:
            self._ttft_ms = (time.time_ns() - self._span.start_time) / 1e6
        self._tail = data[-TAIL_BYTES:]

    def data(self, data: bytes) -> None:
        if self.on:
            self._tail = (self._tail + data[-TAIL_BYTES:])[-TAIL_BYTES:]

    def end(self) -> None:
        """The answer ended: its figures go on the span."""
        if self.on:
            prompt, generated = reply_tokens(self._tail)
            set_usage(self._span, prompt=prompt, generated=generated, ttft_ms=self._ttft_ms)
