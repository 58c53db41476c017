"""A lease in a KV bucket: which one of several registry copies acts on something only one should
(the pins). The holder renews it by compare-and-set; a lease not renewed within its term is taken
over by the next copy that asks.

A copy asks on every change it might act on, which can be many a second; so the holder renews only
every third of the term, and a copy that found another holding it reads the lease again only a
third of a term later (a takeover comes at most that much after the lease lapsed).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable

import msgspec
from corral.runtime.buckets import kv_create
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

_enc = msgspec.json.Encoder()


class _Record(msgspec.Struct, frozen=True):
    holder: str
    at: float  # when the holder last wrote it, by its wall clock


_decoder = msgspec.json.Decoder(_Record)


class Lease:
    """One copy's side of the lease at ``key`` in ``kv``, of ``term_s`` seconds."""

    def __init__(
        self, kv: KeyValue, key: str, term_s: float, *, now: Callable[[], float] = time.time
    ) -> None:
        self._kv = kv
        self._key = key
        self._term_s = term_s
        self._now = now
        self._me = uuid.uuid4().hex
        self._held_at = 0.0  # when this copy last wrote the lease (0: not holding it)
        self._passed_at = -math.inf  # when this copy last found another holding it

    async def held(self) -> bool:
        """Whether this copy holds the lease now: taken or renewed by compare-and-set when due."""
        now = self._now()
        if self._held_at and now - self._held_at < self._term_s / 3:
            return True
        if not self._held_at and now - self._passed_at < self._term_s / 3:
            return False  # another copy held it a moment ago
        revision: int | None = None
        record: _Record | None = None
        try:
            entry = await self._kv.get(self._key)
            revision = entry.revision
            record = _decoder.decode(entry.value) if entry.value else None
        except KeyNotFoundError:
            pass
        except msgspec.DecodeError:
            pass  # unreadable: taken over as if lapsed
        if record is not None and record.holder != self._me and now - record.at < self._term_s:
            return self._pass(now)
        value = _enc.encode(_Record(self._me, now))
        try:
            if revision is None:
                await kv_create(self._kv, self._key, value)
            else:
                await self._kv.update(self._key, value, last=revision)
        except KeyWrongLastSequenceError:  # another copy took it meanwhile
            return self._pass(now)
        self._held_at = now
        return True

    def _pass(self, now: float) -> bool:
        self._held_at = 0.0
        self._passed_at = now
        return False


def held(value: bytes | None, term_s: float, *, now: Callable[[], float] = time.time) -> bool:
    """Whether a lease whose value is ``value`` is held now: written within its term (by the
    writer's clock, so a clock skewed by more than the term reads as no holder)."""
    try:
        record = _decoder.decode(value) if value else None
    except msgspec.DecodeError:
        return False
    return record is not None and now() - record.at < term_s
