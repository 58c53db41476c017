"""Per-key limits and usage, shared by every gateway through JetStream KV.

Requests and tokens per minute count in one KV entry per key and minute (the limits bucket),
updated with compare-and-set, so every gateway reads and adds to the same counts: a request is
admitted while its key's window is under both limits, and adds one request; its reply's tokens are
added when it ends. Concurrency is counted by each gateway alone: behind N gateways a key may run up
to N times its ``concurrency`` at once (see the README's "API keys" for each limit's error bound).

Usage (requests, prompt and eval tokens, errors per key, model and hour or day) is summed in memory
and added to the usage bucket about once a second (`UsageBook.flush`), also with compare-and-set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import nats.errors
from corral.gateway.access import ApiKey, Window, over_limit, retry_after, window_decoder, window_of
from corral.protocol.names import decode_token, encode_token, is_token
from corral.runtime.buckets import kv_create
from corral.runtime.kvwatch import snapshot
from corral.runtime.nats import error_text
from nats.js.errors import Error as JetStreamError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

CAS_TRIES = 20  # compare-and-set attempts before a counter update gives up (and is logged)
NO_MODEL = "-"  # the usage row of calls that name no model (views, management)

_enc = msgspec.json.Encoder()


class Limited(Exception):
    """Over a limit: answer 429 with ``Retry-After: retry_after``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


async def _add(kv: KeyValue, key: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
    """Compare-and-set ``key`` to ``change(current)`` (None: leave it); returns what was written.
    Gives up after `CAS_TRIES` lost races, raising `KeyWrongLastSequenceError`."""
    for _ in range(CAS_TRIES):
        try:
            entry = await kv.get(key)
            current, revision = entry.value, entry.revision
        except KeyNotFoundError:
            current, revision = None, None
        new = change(current)
        if new is None:
            return None
        try:
            if revision is None:
                await kv_create(kv, key, new)
            else:
                await kv.update(key, new, last=revision)
        except KeyWrongLastSequenceError:
            continue  # another gateway wrote first: read again
        return new
    raise KeyWrongLastSequenceError(description=f"{CAS_TRIES} lost races on {key}")


class Limiter:
    """Admission against a key's ``rpm``, ``tpm`` and ``concurrency``. NATS failing under a count
    admits the request (logged): the limits share out the fleet; they are not what keeps it safe."""

    def __init__(self, kv: KeyValue, *, clock: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self._clock = clock
        self._active: dict[str, int] = {}  # key name → its requests in flight at this gateway

    async def admit(self, key: ApiKey) -> None:
        """Count a new request of ``key``, or raise `Limited`. Pair with `release`."""
        if key.concurrency and self._active.get(key.name, 0) >= key.concurrency:
            raise Limited(f"rate limit exceeded: {key.concurrency} concurrent requests", 1)
        # counted before the window's KV round trip, so requests arriving meanwhile see it
        self._active[key.name] = self._active.get(key.name, 0) + 1
        try:
            await self._count_window(key)
        except BaseException:
            self.release(key)
            raise

    async def _count_window(self, key: ApiKey) -> None:
        if key.rpm or key.tpm:
            now = self._clock()
            refused: list[str] = []

            def count(current: bytes | None) -> bytes | None:
                used = window_decoder.decode(current) if current else Window()
                problem = over_limit(key, used)
                if problem is not None:
                    refused.append(problem)
                    return None
                used.requests += 1
                return _enc.encode(used)

            try:
                await _add(self._kv, _window_key(key.name, now), count)
            except (nats.errors.Error, JetStreamError, TimeoutError, msgspec.DecodeError) as e:
                log.warning("could not count a request of key %r (admitted): %r", key.name, e)
            if refused:
                raise Limited(refused[-1], retry_after(now))

    def release(self, key: ApiKey) -> None:
        n = self._active.get(key.name, 0) - 1
        if n > 0:
            self._active[key.name] = n
        else:
            self._active.pop(key.name, None)

    async def add_tokens(self, key: ApiKey, tokens: int) -> None:
        """Add a finished reply's tokens to its key's current window."""

        def add(current: bytes | None) -> bytes:
            used = window_decoder.decode(current) if current else Window()
            used.tokens += tokens
            return _enc.encode(used)

        try:
            await _add(self._kv, _window_key(key.name, self._clock()), add)
        except (nats.errors.Error, JetStreamError, TimeoutError, msgspec.DecodeError) as e:
            log.warning("could not count %d tokens of key %r: %r", tokens, key.name, e)


def _window_key(name: str, now: float) -> str:
    return f"{name}.{window_of(now)}"


# -- usage -------------------------------------------------------------------------------------------
class Usage(msgspec.Struct, kw_only=True):
    """One key's use of one model in one hour (``period`` ``2025-01-31T14``) or day (``2025-01-31``)."""

    key: str
    model: str
    period: str
    requests: int = 0
    prompt_tokens: int = 0
    eval_tokens: int = 0
    errors: int = 0

    def add(self, other: Usage) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.eval_tokens += other.eval_tokens
        self.errors += other.errors


usage_decoder = msgspec.json.Decoder(Usage)


def periods(now: float) -> tuple[str, str]:
    """The hour and the day (UTC) that ``now`` falls in."""
    t = datetime.fromtimestamp(now, UTC)
    return t.strftime("%Y-%m-%dT%H"), t.strftime("%Y-%m-%d")


def usage_key(name: str, model: str, period: str) -> str:
    """``{key}.{model token}.{h|d}{period digits}``: a valid KV key, listable per key by ``{key}.>``."""
    token = encode_token(model) if model else NO_MODEL
    kind = "h" if "T" in period else "d"
    return f"{name}.{token}.{kind}{period.replace('-', '').replace('T', '')}"


def usage_model(token: str) -> str:
    """The model of a usage key's token part ('' for calls that named none)."""
    return decode_token(token) if token != NO_MODEL and is_token(token) else ""


class UsageBook:
    """Usage summed in memory per key, model and period; `flush` adds it to the usage bucket."""

    def __init__(self, kv: KeyValue, *, clock: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self._clock = clock
        self._pending: dict[str, Usage] = {}

    def record(self, key: str, model: str, *, prompt: int, generated: int, error: bool) -> None:
        for period in periods(self._clock()):
            k = usage_key(key, model, period)
            row = self._pending.setdefault(k, Usage(key=key, model=model, period=period))
            row.add(Usage(key=key, model=model, period=period, requests=1, prompt_tokens=prompt,
                          eval_tokens=generated, errors=int(error)))  # fmt: skip

    async def flush(self) -> None:
        """Add what was recorded to the bucket; what cannot be written now is kept for the next."""
        pending, self._pending = self._pending, {}
        for k, delta in pending.items():

            def add(current: bytes | None, delta: Usage = delta) -> bytes:
                row = (
                    usage_decoder.decode(current)
                    if current
                    else Usage(key=delta.key, model=delta.model, period=delta.period)
                )
                row.add(delta)
                return _enc.encode(row)

            try:
                await _add(self._kv, k, add)
            except (nats.errors.Error, JetStreamError, TimeoutError) as e:
                log.warning("usage not written yet (%s); kept for the next flush", error_text(e))
                self._pending.setdefault(k, Usage(key=delta.key, model=delta.model, period=delta.period)).add(
                    delta
                )


async def read_usage(kv: KeyValue, name: str | None = None) -> list[Usage]:
    """Every usage row (of key ``name``, when given), oldest period first."""
    rows: list[Usage] = []
    for entry in await snapshot(kv, f"{name}.>" if name else ">"):
        try:
            rows.append(usage_decoder.decode(entry.value or b""))
        except msgspec.DecodeError:
            log.warning("ignoring an undecodable usage row %r", entry.key)
    return sorted(rows, key=lambda r: (r.key, r.period, r.model))
