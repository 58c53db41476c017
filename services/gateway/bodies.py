"""What the gateway reads of a request body: only the fields it routes on, decoded with msgspec.

The body itself travels on unchanged; the one exception is a vendor pin in the model name
(``amd/llama3``), which `services.client.dispatch.model_work` strips before Ollama sees it.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

# msgspec cannot decode a value into `Raw | None`; an explicit null Raw stands for "absent"
_NULL = msgspec.Raw(b"null")
_GO_DURATION = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_NUMBER = re.compile(r"\d+\.?\d*|\.\d+")


class RouteView(msgspec.Struct):
    model: str | None = None
    name: str | None = None  # alias Ollama accepts on show/pull/push/create/delete
    stream: bool | None = None
    keep_alive: msgspec.Raw = _NULL
    prompt: str | None = None
    messages: list[msgspec.Raw] | None = None
    input: msgspec.Raw = _NULL


_view = msgspec.json.Decoder(RouteView)
_any = msgspec.json.Decoder()


def decode_view(body: bytes) -> RouteView:
    return _view.decode(body)


def keep_alive_is_zero(raw: msgspec.Raw | None) -> bool:
    """``0``, ``0.0``, ``"0"``, ``"0s"``, ``"0m0s"`` … — Ollama's "unload now" (a Go duration of zero)."""
    if raw is None:
        return False
    v: Any = _any.decode(raw)
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return v == 0
    if isinstance(v, str):
        s = v.strip()
        if s in ("0", "-0", "+0"):
            return True
        return _GO_DURATION.fullmatch(s) is not None and all(float(n) == 0 for n in _NUMBER.findall(s))
    return False


def is_unload(endpoint: str, view: RouteView) -> bool:
    if endpoint == "/api/generate":
        return not view.prompt and keep_alive_is_zero(view.keep_alive)
    if endpoint == "/api/chat":
        return not view.messages and keep_alive_is_zero(view.keep_alive)
    return False
