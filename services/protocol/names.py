"""Ollama model names: parsing, normalising, vendor pins and the reversible subject token.

Grammar (Ollama's types/model/name.go): ``[host/][namespace/]model[:tag]``; missing parts default to
``registry.ollama.ai``, ``library`` and ``latest``. Matching is case-insensitive, so
``Llama3.2``, ``llama3.2:latest`` and ``registry.ollama.ai/library/llama3.2:latest`` are one model.

``ModelName.key`` (the lower-cased display form) is what routing compares; ``ModelName.token`` is
that key escaped into one NATS subject token that is also a valid JetStream KV key: every byte
outside ``[a-z0-9_/-]`` becomes ``=XX`` (upper-case hex), so ``llama3.2:latest`` becomes
``llama3=2E2=3Alatest`` and decodes back exactly.
"""

from __future__ import annotations

import functools
import re
from typing import Final

import msgspec
from corral.protocol.errors import InvalidModelName

DEFAULT_HOST: Final = "registry.ollama.ai"
DEFAULT_NAMESPACE: Final = "library"
DEFAULT_TAG: Final = "latest"
MAX_NAME_LENGTH: Final = 512  # characters of a name as a client spells it (vendor pin and scheme included)
SCHEMES: Final = ("http://", "https://")  # the only prefixes a name may carry before its host

VENDORS: Final = ("nvidia", "amd", "intel", "apple", "cpu")
ANY_VENDOR: Final = "any"

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_/-")
_TOKEN = re.compile(r"(?:[a-z0-9_/-]|=[0-9A-F]{2})+")


class ModelName(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    # `dict=True` only to let the derived names below be computed once per name: a request's
    # routing reads them a dozen times
    host: str
    namespace: str
    model: str
    tag: str

    @functools.cached_property
    def display(self) -> str:
        """The shortest form, as ``/api/tags`` and ``/api/ps`` show it."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def canonical(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @functools.cached_property
    def key(self) -> str:
        """What two spellings of one model have in common: the lower-cased display form."""
        return self.display.lower()

    @functools.cached_property
    def token(self) -> str:
        return encode_token(self.key)


def parse_name(raw: str) -> ModelName:
    """Parse an Ollama model name; raise `InvalidModelName` where Ollama answers 400.

    A name is at most `MAX_NAME_LENGTH` characters; before its host it may carry ``http://`` or
    ``https://`` (Ollama's insecure-registry spelling) and nothing else, so no part of a name is
    ignored however long it is.
    """
    if len(raw) > MAX_NAME_LENGTH:
        raise InvalidModelName(raw[:80])
    s = raw
    if "://" in s:
        scheme, s = s.split("://", 1)
        if scheme.lower() + "://" not in SCHEMES:
            raise InvalidModelName(raw)
    tag = DEFAULT_TAG
    colon, slash = s.rfind(":"), s.rfind("/")
    if colon > slash:
        s, tag = s[:colon], s[colon + 1 :]
    parts = s.split("/")
    if len(parts) > 3:
        raise InvalidModelName(raw)
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
    if not (
        _valid(host, _HOST, 350)
        and _valid(namespace, _NAMESPACE, 80)
        and _valid(model, _PART, 80)
        and _valid(tag, _PART, 80)
    ):
        raise InvalidModelName(raw)
    return ModelName(host=host, namespace=namespace, model=model, tag=tag)


def _valid(part: str, pattern: re.Pattern[str], limit: int) -> bool:
    return 0 < len(part) <= limit and pattern.fullmatch(part) is not None


def split_vendor_pin(raw: str) -> tuple[str | None, str]:
    """``amd/llama3`` and ``llama3@amd`` → ``("amd", "llama3")``; anything else → ``(None, raw)``.

    A leading vendor segment wins over an Ollama namespace of the same name; spell such a
    model with its host (``registry.ollama.ai/amd/x``) to reach it.
    """
    at = raw.rfind("@")
    if at > 0 and raw[at + 1 :].lower() in VENDORS:
        return raw[at + 1 :].lower(), raw[:at]
    slash = raw.find("/")
    if slash > 0 and raw[:slash].lower() in VENDORS and slash < len(raw) - 1:
        return raw[:slash].lower(), raw[slash + 1 :]
    return None, raw


# Model tokens are made and read on every request for the same few models: cache both ways.
@functools.lru_cache(maxsize=4096)
def encode_token(key: str) -> str:
    return "".join(chr(b) if b in _SAFE else f"={b:02X}" for b in key.encode())


@functools.lru_cache(maxsize=4096)
def decode_token(token: str) -> str:
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"not a model token: {token!r}")
    return re.sub(r"=([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), token).encode("latin-1").decode()


@functools.lru_cache(maxsize=4096)
def is_token(token: str) -> bool:
    """``token`` is what `encode_token` makes of some name: escapes that decode (UTF-8) and none
    that need not be there, so every model has exactly one token and every token decodes."""
    try:
        return encode_token(decode_token(token)) == token
    except ValueError:  # not token-shaped, or escapes that are not UTF-8 (UnicodeDecodeError)
        return False


@functools.lru_cache(maxsize=4096)
def key_of(name: str) -> str | None:
    """The routing key of a model name as Ollama reports or a client sends it; None when it is not a
    valid Ollama name. The one rule every view, index and router uses: a name without a key is shown
    nowhere and routed nowhere. Memoised: the same names repeat on every fleet snapshot."""
    try:
        return parse_name(name).key
    except InvalidModelName:
        return None


def registry_host(name: str) -> str:
    """The registry host a model name pulls from, lower-cased (``registry.ollama.ai`` when the name
    has none); raises `InvalidModelName` for a name Ollama would refuse."""
    return parse_name(name).host.lower()


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a pull from registry ``host`` (`ModelName.host`, `registry_host`) is allowed by
    ``allowed`` (hosts, case-insensitive; a host with a port must be listed with it)."""
    return host.lower() in {a.strip().lower() for a in allowed}


def registry_refused(host: str) -> str:
    """The 400's message for a pull from a registry that is not allowed."""
    return f"pull model manifest: registry '{host}' is not allowed on this server"
