"""What the gateway reads of a request body: only the fields it routes on, decoded with msgspec.

The body itself travels on unchanged; the one exception is a vendor pin in the model name
(``amd/llama3``), which `corral.transport.model_work` strips before Ollama sees it.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import msgspec
from corral.protocol.envelope import MAX_NUM_CTX, MIN_NUM_CTX
from corral.protocol.gojson import as_go_reads, first_value, fold_keys
from corral.transport import WorkRequest

# msgspec cannot decode a value into `Raw | None`; an explicit null Raw stands for "absent"
_NULL = msgspec.Raw(b"null")
_GO_DURATION = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_NUMBER = re.compile(r"\d+\.?\d*|\.\d+")
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class RouteView(msgspec.Struct):
    model: str | None = None
    name: str | None = None  # alias Ollama accepts on show/pull/push/create/delete
    stream: bool | None = None
    keep_alive: msgspec.Raw = _NULL
    prompt: str | None = None
    messages: list[msgspec.Raw] | None = None
    input: msgspec.Raw = _NULL
    options: msgspec.Raw = _NULL


class _RunnerOptions(msgspec.Struct):
    num_ctx: Any = None


class _Message(msgspec.Struct):
    role: str = ""
    content: Any = None


_view = msgspec.json.Decoder(RouteView)
_any = msgspec.json.Decoder()
_options = msgspec.json.Decoder(_RunnerOptions)
_message = msgspec.json.Decoder(_Message)
_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])
_VIEW_FIELDS = frozenset(RouteView.__struct_fields__)
_enc = msgspec.json.Encoder(order="sorted")


def decode_view(body: bytes) -> RouteView:
    """The routing fields (`read_view`)."""
    return read_view(body)[0]


def read_view(body: bytes) -> tuple[RouteView, bytes]:
    """The routing fields, and the body to send on, read as Go reads it (`corral.protocol.gojson`:
    Ollama serves such bodies). One with bytes that are not UTF-8 or with lone surrogate escapes
    travels on unchanged: Ollama reads it alike. One with text after its JSON value, or with the
    fields spelt in other letter case (``"Model"``), travels on as Ollama reads it, re-encoded, so
    that whatever reads it after the gateway reads the same."""
    try:
        view = _view.decode(body)
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError as e:
        view, body = _as_go_reads(body, e)
    # a client that spells ``Model`` or ``KEEP_ALIVE``: the keys, not the struct, tell (a few µs
    # for a small body, a second pass for a large one)
    return _folded(view, body)


def _as_go_reads(body: bytes, error: msgspec.DecodeError) -> tuple[RouteView, bytes]:
    fixed = as_go_reads(body)
    if fixed != body:
        try:
            return _view.decode(fixed), body
        except msgspec.DecodeError:
            pass
    first = first_value(fixed)
    if first is None:
        raise error
    return _view.decode(first), first


def _folded(view: RouteView, body: bytes) -> tuple[RouteView, bytes]:
    try:
        fields = _fields.decode(body)
    except msgspec.DecodeError:  # not UTF-8: as Go reads it (it decoded so into ``view``)
        fields = _fields.decode(as_go_reads(body))
    folded = fold_keys(fields, _VIEW_FIELDS)
    if folded is None:
        return view, body
    body = _enc.encode(folded)
    return _view.decode(body), body


def keep_alive_is_zero(raw: msgspec.Raw | None) -> bool:
    """``0``, ``0.0``, ``"0"``, ``"0s"``, ``"0m0s"`` … — Ollama's "unload now" (a Go duration of zero)."""
    return keep_alive_s(raw) == 0.0


def keep_alive_s(raw: msgspec.Raw | None) -> float | None:
    """The keep_alive Ollama reads (api.Duration): a number as seconds, a string as a Go duration,
    a negative one as forever (``inf``); None when absent, null or what Ollama refuses (400)."""
    if raw is None:
        return None
    try:
        v: Any = _any.decode(raw)
    except msgspec.ValidationError:
        return None
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):  # an integer past float's range: as long as a Go duration gets
        return math.inf if v < 0 else float(min(v, 2**63))
    if not isinstance(v, str):
        return None
    s = v.strip()
    if s in ("0", "-0", "+0"):
        return 0.0
    if _GO_DURATION.fullmatch(s) is None:
        return None
    seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(s))
    return math.inf if s.startswith("-") and seconds > 0 else seconds


def ends_runner(raw: msgspec.Raw | None) -> bool:
    """A keep_alive under a second: the runner ends with the request, or a moment after it (what a
    user key may not do to a runner others share)."""
    seconds = keep_alive_s(raw)
    return seconds is not None and seconds < 1.0


def names_keep_alive(view: RouteView) -> bool:
    """Whether the body gives a keep_alive (not null): its runner's expiry changes with it."""
    return view.keep_alive is not _NULL and view.keep_alive != _NULL


def is_unload(endpoint: str, view: RouteView) -> bool:
    if endpoint == "/api/generate":
        return not view.prompt and keep_alive_is_zero(view.keep_alive)
    if endpoint == "/api/chat":
        return not view.messages and keep_alive_is_zero(view.keep_alive)
    return False


def num_ctx(view: RouteView) -> int | None:
    """``options.num_ctx`` when it is a number: at least 4 (Ollama raises a smaller one, zero and
    negative ones too, to 4, a runner of its own), at most `MAX_NUM_CTX` (Ollama clamps a context
    past the model's trained one to it, and so does the router); None otherwise (a wrong type is
    left for Ollama to reject in its own words)."""
    if view.options is _NULL or view.options == _NULL:
        return None
    try:
        value = _options.decode(view.options).num_ctx
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value >= MAX_NUM_CTX:
        return MAX_NUM_CTX
    return max(int(value), MIN_NUM_CTX)  # Ollama truncates floats into int options


def streams(endpoint: str, view: RouteView) -> bool:
    """Whether Ollama streams its answer: by default on its native generate and chat, only when
    asked on the OpenAI-compatible routes, never for embeddings."""
    if endpoint in ("/api/generate", "/api/chat"):
        return view.stream is not False
    return endpoint in _V1_STREAMED and view.stream is True


_V1_STREAMED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"})


def derive(work: WorkRequest, view: RouteView) -> None:
    """Set on ``work`` what routing reads of its body, once, for the gateway and the direct NATS
    client alike: the runner's context, whether Ollama streams its answer, whether it names a
    keep_alive and ends the runner with it, and the conversation a chat continues."""
    work.num_ctx = num_ctx(view)
    work.streams = streams(work.endpoint, view)
    work.keep_alive = names_keep_alive(view)
    work.expires_now = work.keep_alive and ends_runner(view.keep_alive)
    if view.messages and work.model is not None:
        work.session, work.follow_up = session(work.model.key, view)


def session(model_key: str, view: RouteView) -> tuple[str | None, bool]:
    """(session key, whether this request continues a conversation) for a chat body.

    The key is a digest of the model and the conversation's opening — every message up to and
    including the first user message, by role and content — so each turn of one chat, which resends
    the whole history, maps to the same key, and two chats that open differently do not. A request
    continues a conversation when it carries messages after that opening (earlier turns' replies).
    Only the opening messages are decoded, however long the history.
    """
    msgs = view.messages
    if not msgs:
        return None, False
    h = hashlib.blake2b(model_key.encode(), digest_size=12)
    for i, raw in enumerate(msgs):
        try:
            m = _message.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None, False
        h.update(b"\0" + m.role.encode() + b"\0" + _enc.encode(m.content))
        if m.role == "user":
            return h.hexdigest(), len(msgs) > i + 1
    return None, False
