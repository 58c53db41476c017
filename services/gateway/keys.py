"""The gateway's API keys in JetStream KV: the buckets, the records (`corral keys` writes them), and
`KeyStore`, every gateway's live copy of them.

Each gateway watches the keys bucket, so a key created or revoked anywhere reaches every gateway
as a KV event, within milliseconds; a lookup is one SHA-256 and a dict read, with no NATS round trip.
Only hashes are stored (`corral.gateway.access`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import msgspec
from corral.gateway.access import ApiKey, Role, api_key_decoder, hash_key, new_key, same_hash
from corral.protocol.priority import Priority
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import KEY_BUCKETS, kv_create, open_bucket
from corral.runtime.kvwatch import snapshot, watching
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

_enc = msgspec.json.Encoder()


class KeyExists(Exception):
    """A key of that name exists already: revoke it first."""


@dataclass(frozen=True)
class KeyBuckets:
    keys: KeyValue  # name → `ApiKey`
    usage: KeyValue  # `corral.gateway.limits.usage_key` → `Usage`
    limits: KeyValue  # name and minute → `corral.gateway.access.Window`


async def open_key_buckets(js: JetStreamContext, subjects: Subjects, *, replicas: int = 1) -> KeyBuckets:
    """Open the keys, usage and limits buckets, creating what does not exist yet (idempotent)."""
    return KeyBuckets(
        keys=await open_bucket(js, subjects.keys_bucket, KEY_BUCKETS["keys"], replicas=replicas),
        usage=await open_bucket(js, subjects.usage_bucket, KEY_BUCKETS["usage"], replicas=replicas),
        limits=await open_bucket(js, subjects.limits_bucket, KEY_BUCKETS["limits"], replicas=replicas),
    )


# -- the records, for `corral keys` -------------------------------------------------------------------
async def create_key(
    kv: KeyValue,
    name: str,
    *,
    role: Role = "user",
    models: tuple[str, ...] = (),
    rpm: int = 0,
    tpm: int = 0,
    concurrency: int = 0,
    priority: Priority = "interactive",
) -> str:
    """Store a new key's record under ``name`` and return the key (its only copy); `KeyExists` when
    the name is taken."""
    key = new_key()
    record = ApiKey(
        name=name,
        hash=hash_key(key),
        role=role,
        models=models,
        rpm=rpm,
        tpm=tpm,
        concurrency=concurrency,
        priority=priority,
        created_at=round(time.time(), 3),
    )
    try:
        await kv_create(kv, name, _enc.encode(record))
    except KeyWrongLastSequenceError:
        raise KeyExists(name) from None
    return key


async def list_keys(kv: KeyValue) -> list[ApiKey]:
    return sorted((await _snapshot(kv)).values(), key=lambda k: k.name)


async def revoke_key(kv: KeyValue, name: str) -> bool:
    """Delete the key called ``name``; False when there is none."""
    try:
        await kv.get(name)
    except KeyNotFoundError:
        return False
    await kv.delete(name)
    return True


async def _snapshot(kv: KeyValue) -> dict[str, ApiKey]:
    """Every record in the bucket now (a watch's initial values)."""
    out: dict[str, ApiKey] = {}
    for entry in await snapshot(kv):
        record = _decode(entry.key, entry.value)
        if record is not None:
            out[record.name] = record
    return out


def _decode(name: str, value: bytes | None) -> ApiKey | None:
    try:
        record = api_key_decoder.decode(value or b"")
    except msgspec.DecodeError:
        log.warning("ignoring an undecodable API key record %r", name)
        return None
    if record.name != name:  # a record counts only under its own name
        log.warning("ignoring API key record %r: it names %r", name, record.name)
        return None
    return record


class KeyStore:
    """Every gateway's live copy of the keys bucket, kept by a KV watch (`watch_once`, run under
    `corral.runtime.nats.watch_forever` by `corral.gateway.auth.Access`)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._by_hash: dict[str, ApiKey] = {}
        self.loaded = asyncio.Event()  # the first snapshot is in
        self._changed = asyncio.Event()

    def lookup(self, key: str) -> ApiKey | None:
        """The record of ``key``, or None for a key that is unknown or revoked."""
        digest = hash_key(key)
        record = self._by_hash.get(digest)
        if record is None or not same_hash(record.hash, digest):
            return None
        return record

    def by_name(self, name: str) -> ApiKey | None:
        """The record of the key called ``name`` (None when there is none, or it was revoked); the
        keys are few, so a scan of the live copy, not a KV read."""
        return next((r for r in self._by_hash.values() if r.name == name), None)

    async def wait_changed(self, timeout: float) -> None:
        """Wait for the next change to the keys (tests; woken by each KV event)."""
        self._changed.clear()
        async with asyncio.timeout(timeout):
            await self._changed.wait()

    async def watch_once(self) -> None:
        """Follow the bucket: the initial values replace what was known (a key revoked while the
        watch was down is gone), then each put and delete as it comes."""
        fresh: dict[str, ApiKey] | None = {}
        names: dict[str, str] = {}  # name → hash, to drop a revoked key's entry
        async with watching(self.kv) as watcher:
            async for entry in watcher:
                if entry is None:  # the initial values are in
                    if fresh is not None:
                        self._by_hash, fresh = fresh, None
                        self.loaded.set()
                        self._changed.set()
                    continue
                target = self._by_hash if fresh is None else fresh
                old = names.pop(entry.key, None)
                if old is not None:
                    target.pop(old, None)
                if entry.operation not in ("DEL", "PURGE"):
                    record = _decode(entry.key, entry.value)
                    if record is not None:
                        target[record.hash] = record
                        names[entry.key] = record.hash
                if fresh is None:
                    if old is not None and entry.operation in ("DEL", "PURGE"):
                        log.info("API key %r revoked", entry.key)
                    self._changed.set()
