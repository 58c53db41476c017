"""One Ollama call as it travels to an agent: `WorkRequest`, and `model_work` to build one from the
model name a client spelt."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
from corral.protocol.errors import BadRequest
from corral.protocol.names import ModelName, parse_name, split_vendor_pin
from corral.protocol.priority import Priority
from corral.transport.bodies import BodySource

_any = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()


@dataclass
class WorkRequest:
    """One Ollama call to route. ``body`` is the client's bytes, sent on unchanged; or, with
    ``stream``, the body is still arriving from the client and is served to the agent as it asks
    (a blob upload: `corral.transport.bodies`), ``body`` left empty.

    Twenty attributes: what the client sent (endpoint, method, body or its stream, trace context)
    and what the gateway derived from it once, so that routing never parses the body again
    (model, vendor pin, context, conversation, strategy, priority, unload, keep_alive, whether it
    streams, the names to restore, the models its API key may be served by)."""

    endpoint: str
    body: bytes
    model: ModelName | None = None
    vendor: str | None = None  # vendor pin
    strict: bool = False  # the pin may not fall back to other vendors
    echo_model: str | None = None  # when a pin was stripped from the body: restore in replies
    upstream_model: str | None = None
    method: str = "POST"
    trace: dict[str, str] = field(default_factory=dict)
    strategy: str | None = None  # None = the planner's default (see corral.routing)
    num_ctx: int | None = None  # the request's runner context (options.num_ctx); None = default
    session: str | None = None  # conversation key (`corral.gateway.bodies.session`)
    follow_up: bool = False  # the request continues that conversation
    unload: bool = False  # keep_alive 0 with nothing to run (the agent re-reads /api/ps after it)
    keep_alive: bool = False  # the body names a keep_alive (the agent re-reads /api/ps after it)
    expires_now: bool = False  # that keep_alive is 0: the runner ends with the request (read before it ends)
    stream: BodySource | None = None  # a body read from its client only as the agent asks for it
    priority: Priority = "interactive"  # batch work takes only slots no interactive request waits for
    streams: bool = False  # the body asks Ollama to stream its answer
    allowed: tuple[str, ...] = ()  # its API key's model allow-list (globs; empty: any model)


def model_work(
    endpoint: str,
    body: bytes,
    raw_model: str,
    *,
    vendor: str | None = None,
    strict: bool = False,
    strategy: str | None = None,
) -> WorkRequest:
    """A routed request for ``raw_model`` as the client spelt it (``amd/llama3``, ``llama3@amd`` ...).

    A vendor pin in the name wins over ``vendor``; it is stripped from the body Ollama sees and
    restored in its replies. Raises `InvalidModelName` or `BadRequest` for unusable names.
    """
    if not raw_model:
        raise BadRequest("model is required")
    pinned, name = split_vendor_pin(raw_model)
    vendor = pinned or vendor
    work = WorkRequest(
        endpoint=endpoint,
        body=body,
        model=parse_name(name),
        vendor=vendor,
        strict=strict and vendor is not None,
        strategy=strategy,
    )
    if name != raw_model:
        obj = _any.decode(body)
        obj["model"] = name
        work.body = _enc.encode(obj)
        work.echo_model, work.upstream_model = raw_model, name
    return work
