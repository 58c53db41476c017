"""The request envelope: everything a work message carries besides the Ollama body, as one value.

A sender builds a `RequestEnvelope` and publishes ``envelope.headers()`` with the body verbatim as
the payload; a receiver calls `decode_request` on the message's headers. Decoding validates every
field: a malformed header is a `BadEnvelope` (a `BadRequest`, code ``bad_request``) that the
receiver answers to the sender, never an exception that escapes its loop.

Headers (names in `corral.protocol.headers`)::

    Corral-Request         request id: 1-64 characters of [A-Za-z0-9_-]
    Corral-Endpoint        the Ollama path (``/api/...`` or ``/v1/...``)
    Corral-Method          HTTP method; absent = POST
    Corral-Deadline        unix time in ms after which the request is dropped unstarted; 0/absent = none
    Corral-Model           the model's subject token (`corral.protocol.names.encode_token`)
    Corral-Echo-Model      with Corral-Upstream-Model: the client's spelling, restored in replies
    Corral-Upstream-Model  the name Ollama sees
    Corral-Body-Size       the body's size when it is not the payload: larger than the payload limit,
                           or still arriving at the sender (a blob upload); the receiver fetches it
                           in chunks from ``body.{origin}.{rid}`` (the exchange: see
                           `corral.transport.bodies`), at most `MAX_BODY_SIZE`
    Corral-Origin          with Corral-Body-Size: the sender's id, whose body subject serves the bytes
    Corral-Num-Ctx         the request's own options.num_ctx
    Corral-Unload          a keep_alive 0 unload (any value)
    Corral-Keep-Alive      the request names a keep_alive: what its runner shows changes; ``0`` when
                           it is zero (the runner ends with the request), else any other value
    Corral-Now             a direct send that must not wait in the agent's FIFO: busy instead
    Corral-Stream          the body asks Ollama to stream its answer (any value)
    Corral-Reply           a queued request's reply subject (JetStream keeps headers, not reply-to)
    Corral-Window          the requester reads the reply's body in windows of this many bytes: the
                           sender has at most that many sent and not yet taken (its ``read`` controls
                           on ``agent.{id}.ctl`` say how many it took); absent = no window
    traceparent/tracestate W3C trace context (https://www.w3.org/TR/trace-context/), only when
                           well formed: traceparent 55 characters, tracestate at most 512

Size: a NATS message is its headers plus its payload, and a server closes the connection of a client
that publishes more than its ``max_payload``. `header_size` is what a header map adds on the wire;
a sender keeps a body inline only when `fits` says body and headers together stay under the limit
less `HEADER_HEADROOM`, the room for what is added after the envelope (the trace context of the
publish span, a queued request's reply subject).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

import msgspec
from corral.protocol import headers as H
from corral.protocol.errors import BadEnvelope
from corral.protocol.names import MAX_NAME_LENGTH, is_token
from corral.protocol.subjects import is_sender, usable_reply

__all__ = [
    "HEADER_HEADROOM",
    "MAX_BODY_SIZE",
    "METHODS",
    "BadEnvelope",
    "RequestEnvelope",
    "decode_request",
    "fits",
    "header_size",
    "trace_context",
]

METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE"})
HEADER_HEADROOM: Final = 8 * 1024  # room under max_payload for headers added after the envelope
_RID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENDPOINT = re.compile(r"/(api|v1)(/[A-Za-z0-9_.:/-]*)?")
_MAX_NAME = MAX_NAME_LENGTH  # characters of a model name carried in Echo/Upstream headers
MAX_BODY_SIZE: Final = 1 << 40  # the largest Corral-Body-Size a receiver accepts
MAX_NUM_CTX: Final = 1 << 24  # a Corral-Num-Ctx above this is refused (no model is trained past it)
MIN_NUM_CTX: Final = 4  # Ollama raises a smaller num_ctx to this
_MAX_TRACE = 512
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_TRACESTATE_MEMBER = re.compile(
    r"[a-z0-9][_0-9a-z*/@-]{0,255}=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_TRACESTATE_MEMBERS = 32
_NATS_HEADER_LINE = len("NATS/1.0\r\n") + len("\r\n")


class RequestEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """Eighteen attributes: the headers of the table above, each read once here (Corral-Keep-Alive
    gives two, whether a keep_alive is named and whether it is zero; the trace context's two are
    one)."""

    rid: str
    endpoint: str
    deadline_ms: int = 0
    model: str | None = None  # subject token
    method: str = "POST"
    echo_model: str | None = None
    upstream_model: str | None = None
    body_size: int | None = None
    origin: str | None = None  # the sender's id; set with body_size
    num_ctx: int = 0  # 0 = the backend's default
    unload: bool = False
    keep_alive: bool = False
    expires_now: bool = False  # keep_alive 0 with something to run: the runner ends with the request
    now: bool = False  # a direct send that must not wait in the agent's FIFO: busy instead
    stream: bool = False  # the body asks Ollama to stream its answer
    reply: str | None = None
    window: int = 0  # bytes the sender may have sent and the requester not yet taken; 0 = no window
    trace: dict[str, str] = msgspec.field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        """The NATS headers for this envelope (only the fields that differ from the defaults)."""
        h = {H.REQUEST: self.rid, H.ENDPOINT: self.endpoint, **self.trace}
        if self.deadline_ms:
            h[H.DEADLINE] = str(self.deadline_ms)
        if self.model is not None:
            h[H.MODEL] = self.model
        if self.method != "POST":
            h[H.METHOD] = self.method
        if self.num_ctx:
            h[H.NUM_CTX] = str(self.num_ctx)
        if self.unload:
            h[H.UNLOAD] = "1"
        if self.keep_alive or self.expires_now:
            h[H.KEEP_ALIVE] = "0" if self.expires_now else "1"
        if self.now:
            h[H.NOW] = "1"
        if self.stream:
            h[H.STREAM] = "1"
        if self.echo_model and self.upstream_model:
            h[H.ECHO_MODEL] = self.echo_model
            h[H.UPSTREAM_MODEL] = self.upstream_model
        if self.body_size is not None:
            h[H.BODY_SIZE] = str(self.body_size)
            if self.origin:
                h[H.ORIGIN] = self.origin
        if self.reply:
            h[H.REPLY] = self.reply
        if self.window:
            h[H.WINDOW] = str(self.window)
        return h


def decode_request(headers: Mapping[str, str] | None) -> RequestEnvelope:
    """The envelope of a work message; `BadEnvelope` names the first field that is wrong."""
    h = headers or {}
    rid = h.get(H.REQUEST, "")
    if not _RID.fullmatch(rid):
        raise BadEnvelope(f"bad {H.REQUEST} header {rid[:80]!r}")
    endpoint = h.get(H.ENDPOINT, "")
    if not _ENDPOINT.fullmatch(endpoint) or ".." in endpoint:
        raise BadEnvelope(f"bad {H.ENDPOINT} header {endpoint[:80]!r}")
    method = h.get(H.METHOD, "POST")
    if method not in METHODS:
        raise BadEnvelope(f"bad {H.METHOD} header {method[:20]!r}")
    model = h.get(H.MODEL)
    if model is not None and not is_token(model):
        raise BadEnvelope(f"bad {H.MODEL} header {model[:80]!r}")
    echo, upstream = h.get(H.ECHO_MODEL), h.get(H.UPSTREAM_MODEL)
    if (echo is None) != (upstream is None) or any(
        v is not None and not 0 < len(v) <= _MAX_NAME for v in (echo, upstream)
    ):
        raise BadEnvelope(f"{H.ECHO_MODEL} and {H.UPSTREAM_MODEL} come together, each a model name")
    body_size = _number(h, H.BODY_SIZE, 1, MAX_BODY_SIZE)
    origin = h.get(H.ORIGIN)
    if body_size is not None and (origin is None or not is_sender(origin)):
        raise BadEnvelope(f"{H.BODY_SIZE} needs a {H.ORIGIN} header naming the sender")
    trace = trace_context(h.get(H.TRACEPARENT), h.get(H.TRACESTATE))
    return RequestEnvelope(
        rid=rid,
        endpoint=endpoint,
        deadline_ms=_number(h, H.DEADLINE, 0, 1 << 62) or 0,
        model=model,
        method=method,
        echo_model=echo,
        upstream_model=upstream,
        body_size=body_size,
        origin=origin if body_size is not None else None,
        num_ctx=_number(h, H.NUM_CTX, 0, MAX_NUM_CTX) or 0,
        unload=H.UNLOAD in h,
        keep_alive=H.KEEP_ALIVE in h,
        expires_now=h.get(H.KEEP_ALIVE) == "0",
        now=H.NOW in h,
        stream=H.STREAM in h,
        reply=_reply(h),
        window=_number(h, H.WINDOW, 1, MAX_BODY_SIZE) or 0,
        trace=trace,
    )


def _number(h: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = h.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise BadEnvelope(f"bad {name} header {raw[:40]!r}")
    return int(raw)


def trace_context(traceparent: str | None, tracestate: str | None) -> dict[str, str]:
    """The W3C trace context worth passing on: a well-formed ``traceparent``, and with it a
    ``tracestate`` of at most 512 characters and 32 well-formed members; anything else is dropped
    (a malformed context starts a new trace, as the W3C recommendation asks)."""
    if traceparent is None or not _TRACEPARENT.fullmatch(traceparent):
        return {}
    out = {H.TRACEPARENT: traceparent}
    if tracestate is not None and tracestate.strip() and len(tracestate) <= _MAX_TRACE:
        members = [m.strip() for m in tracestate.split(",") if m.strip()]
        if len(members) <= _TRACESTATE_MEMBERS and all(_TRACESTATE_MEMBER.fullmatch(m) for m in members):
            out[H.TRACESTATE] = ",".join(members)
    return out


def header_size(headers: Mapping[str, str]) -> int:
    """Bytes a NATS header map adds to a message (its ``NATS/1.0`` block)."""
    return _NATS_HEADER_LINE + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def fits(body_size: int, headers: Mapping[str, str], max_payload: int) -> bool:
    """A body of ``body_size`` bytes can travel inline with ``headers`` under ``max_payload``."""
    return body_size + header_size(headers) <= max_payload - HEADER_HEADROOM


def _reply(h: Mapping[str, str]) -> str | None:
    """A queued request's ``Corral-Reply``: a subject a reply may be sent on, or none at all."""
    reply = h.get(H.REPLY) or None
    if reply is not None and not usable_reply(reply):
        raise BadEnvelope(f"bad {H.REPLY} header {reply[:80]!r}")
    return reply
