"""Who may do what through the gateway, as pure rules: API keys and their hashes, the two roles,
per-key model allow-lists, the per-minute windows the limits count in, the token counts of a
reply, and which registries a model name may make an agent fetch from. No I/O: `corral.gateway.keys`
keeps the records and counters in JetStream KV, `corral.gateway.auth` applies these rules to HTTP.

A key is ``corral-`` and 32 random bytes (`secrets.token_urlsafe`); only its SHA-256 is stored. A
fast unkeyed hash is enough for a high-entropy token: nobody can guess a preimage, so nothing is
gained from a slow password hash, and a lookup costs one hash per request.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import math
import re
import secrets
from typing import Final, Literal

import msgspec
from corral.protocol.endpoints import MODEL_ENDPOINTS
from corral.protocol.names import key_of
from corral.protocol.priority import Priority

Role = Literal["user", "admin"]
ROLES: Final = ("user", "admin")
KEY_PREFIX: Final = "corral-"
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a key's name: also a KV key part
WINDOW_S: Final = 60  # rpm and tpm count in fixed one-minute windows

# What a user key may call: inference and the read-only views. Everything else (pull, push, create,
# copy, delete, blobs, and any route added later) needs an admin key.
_USER_CALLS: Final = frozenset(
    {("POST", e) for e in MODEL_ENDPOINTS}
    | {("POST", "/api/show")}
    | {(m, p) for m in ("GET", "HEAD") for p in ("/api/tags", "/api/version", "/api/ps", "/api/status")}
    | {("GET", "/v1/models")}
    | {("GET", "/api/corral/whoami")}  # the console asks which role it has
)
# What the gateway answers from its own memory, for dashboards, the console and clients that poll
# (Open WebUI lists tags and ps on every page): no key's rpm or concurrency counts them
_VIEWS: Final = frozenset(
    {(m, p) for m in ("GET", "HEAD") for p in ("/api/tags", "/api/version", "/api/ps", "/api/status")}
    | {("GET", "/v1/models"), ("GET", "/api/corral/whoami")}
)
# The console's own admin calls (`corral.gateway.console`: drain, cordon, uncordon, unload) are
# under /api/corral/ and, not being listed above, need an admin key like pull and delete.
_V1_MODEL: Final = "/v1/models/"
# The Files and Batch APIs: a user key sees and uses only the files and batches it made there
_BATCH_PREFIXES: Final = ("/v1/files", "/v1/batches")
OPEN_PATHS: Final = frozenset({"/", "/ready"})  # liveness and readiness answer without a key
CONSOLE_PATH: Final = "/console"  # the console's static pages: open, they hold no fleet data


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """One key's record in the keys bucket (under its name). ``hash``: the key's SHA-256 in hex;
    ``models``: glob patterns over model names (empty: every model); a limit of 0 is no limit."""

    name: str
    hash: str
    role: Role = "user"
    models: tuple[str, ...] = ()
    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    priority: Priority = "interactive"  # the highest this key's requests may ask for
    created_at: float = 0.0

    @property
    def admin(self) -> bool:
        return self.role == "admin"


api_key_decoder = msgspec.json.Decoder(ApiKey)


def new_key() -> str:
    """A fresh key, shown once to whoever made it."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def same_hash(a: str, b: str) -> bool:
    """Compare two hashes in constant time."""
    return hmac.compare_digest(a.encode(), b.encode())


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (what the ``openai`` SDK sends as its
    ``api_key``), else of an ``x-api-key`` header (what the ``anthropic`` SDK sends); None without
    either."""
    other = None
    for k, v in headers:
        if k == b"authorization":
            scheme, _, token = v.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
        if k == b"x-api-key" and v.strip():
            other = v.decode("latin-1").strip()
    return other


def is_open(path: str) -> bool:
    """Whether a path answers without a key: liveness, readiness, and the console's pages (which
    then ask for a key before they read anything)."""
    return path in OPEN_PATHS or path == CONSOLE_PATH or path.startswith(CONSOLE_PATH + "/")


def limited(method: str, path: str) -> bool:
    """Whether a key's limits (rpm, tpm, concurrency) count this call: all but the views polled
    (`_VIEWS`, ``GET /v1/models/{model}``), which would spend a key's budget on nothing."""
    return (method, path) not in _VIEWS and not _v1_model(method, path)


def _v1_model(method: str, path: str) -> bool:
    """``GET /v1/models/{model}``: one model's entry of the list."""
    return method == "GET" and path.startswith(_V1_MODEL) and "/" not in path[len(_V1_MODEL) :]


def user_may(method: str, path: str) -> bool:
    """Whether a user key may make this call; everything else needs an admin key."""
    if (method, path) in _USER_CALLS:
        return True
    if method in ("GET", "POST", "DELETE") and any(
        path == p or path.startswith(p + "/") for p in _BATCH_PREFIXES
    ):
        return True
    return _v1_model(method, path)


def model_allowed(patterns: tuple[str, ...], name: str) -> bool:
    """Whether a key whose allow-list is ``patterns`` may use model ``name``. Globs match the
    model's short display form (``llama3.2:latest``, ``hf.co/user/repo:Q4_K_M``), case-insensitively;
    a pattern without a tag matches every tag (``llama3*`` and ``llama3.2`` both match
    ``llama3.2:latest``). An empty list allows every model."""
    if not patterns:
        return True
    key = key_of(name)
    if key is None:
        return False
    untagged = key.rsplit(":", 1)[0]
    for p in patterns:
        p = p.strip().lower()
        if fnmatch.fnmatchcase(key, p) or (":" not in p and fnmatch.fnmatchcase(untagged, p)):
            return True
    return False


# -- limits: fixed one-minute windows --------------------------------------------------------------
class Window(msgspec.Struct, kw_only=True):
    """What one key has used in one minute, fleet-wide (a value in the limits bucket)."""

    requests: int = 0
    tokens: int = 0


window_decoder = msgspec.json.Decoder(Window)


def window_of(now: float) -> int:
    """The number of the one-minute window ``now`` (unix seconds) falls in."""
    return int(now // WINDOW_S)


def retry_after(now: float) -> int:
    """Whole seconds until the next window opens (at least 1): the ``Retry-After`` of a 429."""
    return max(1, math.ceil((window_of(now) + 1) * WINDOW_S - now))


def over_limit(key: ApiKey, used: Window) -> str | None:
    """Which per-minute limit a new request of ``key`` would pass, given what its window holds; None
    when it may start. A request is admitted while the window is under both limits: its own tokens
    are known only when its reply ends."""
    if key.rpm and used.requests >= key.rpm:
        return f"rate limit exceeded: {key.rpm} requests per minute"
    if key.tpm and used.tokens >= key.tpm:
        return f"rate limit exceeded: {key.tpm} tokens per minute"
    return None


# -- token counts of a reply ------------------------------------------------------------------------
TAIL_BYTES: Final = 8192  # how much of a reply's end is kept to read its counts from
_COUNT_NAMES: Final = (
    b'"prompt_eval_count"',
    b'"eval_count"',
    b'"prompt_tokens"',
    b'"completion_tokens"',
    b'"input_tokens"',
    b'"output_tokens"',
)
_COUNT_VALUE = re.compile(rb"\s*:\s*(\d+)")


def reply_tokens(tail: bytes) -> tuple[int, int]:
    """(prompt, eval) tokens from the end of a reply; (0, 0) if it says none. Native replies end
    with an object carrying ``prompt_eval_count`` and ``eval_count``, /v1 ones with ``usage``
    (``prompt_tokens``, ``completion_tokens``; the Responses and Anthropic APIs' ``input_tokens``,
    ``output_tokens``); the last of each in the tail counts. Read as fields, not as a whole
    object, so a tail that begins mid-object (a long unstreamed reply) still counts; a field name
    inside a JSON string has its quotes escaped and is not taken."""
    found = {name: n for name in _COUNT_NAMES if (n := _last_count(tail, name)) is not None}
    prompt = found.get(b'"prompt_eval_count"', found.get(b'"prompt_tokens"', found.get(b'"input_tokens"', 0)))
    generated = found.get(
        b'"eval_count"', found.get(b'"completion_tokens"', found.get(b'"output_tokens"', 0))
    )
    return prompt, generated


def _last_count(tail: bytes, quoted: bytes) -> int | None:
    """The number after the last ``"name": `` in ``tail`` whose opening quote is not escaped.
    Searched from the end with ``rfind``: a reply's tail is up to 16 KiB, and a regular expression
    tried at each of its bytes took several percent of a busy gateway's CPU."""
    end = len(tail)
    while (i := tail.rfind(quoted, 0, end)) >= 0:
        if i == 0 or tail[i - 1] != 0x5C:  # not \" (a field name quoted inside a JSON string)
            m = _COUNT_VALUE.match(tail, i + len(quoted))
            if m is not None:
                return int(m.group(1))
        end = i
    return None
