"""Connect to NATS and make sure the JetStream buckets Corral needs exist."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nats
from corral.protocol.subjects import Subjects
from corral.runtime.workqueue import ensure_stream
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)


async def connect(url: str, *, name: str) -> NATS:
    """A connection that reconnects forever and reports state changes in the log."""

    nc: NATS | None = None

    async def on_disconnect() -> None:
        if nc is not None and (nc.is_closed or nc.is_draining):
            log.debug("%s: NATS connection closed", name)
        else:
            log.warning("%s: disconnected from NATS", name)

    async def on_reconnect() -> None:
        log.info("%s: reconnected to NATS", name)

    async def on_error(e: Exception) -> None:
        log.warning("%s: NATS error: %s", name, e)

    nc = await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
        drain_timeout=5,  # bounded: a stop never waits longer than this for subscriptions to drain
    )
    return nc


@dataclass(frozen=True)
class Buckets:
    agents: KeyValue
    models: KeyValue  # registry: model index (``model.*``) and load markers (``loading.*``)
    sessions: KeyValue
    views: KeyValue


async def ensure_buckets(js: JetStreamContext, subjects: Subjects) -> Buckets:
    """Open the KV buckets and the overflow queue's stream, creating what does not exist yet
    (idempotent across services)."""

    async def bucket(name: str, *, ttl: float | None = None) -> KeyValue:
        try:
            return await js.key_value(name)
        except BucketNotFoundError:
            cfg = KeyValueConfig(bucket=name, history=1, ttl=ttl, storage=StorageType.MEMORY)
            return await js.create_key_value(cfg)

    await ensure_stream(js, subjects)
    return Buckets(
        agents=await bucket(subjects.agents_bucket),
        models=await bucket(subjects.models_bucket),
        sessions=await bucket(subjects.sessions_bucket, ttl=3600.0),
        views=await bucket(subjects.views_bucket),
    )
