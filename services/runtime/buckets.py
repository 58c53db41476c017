"""The JetStream buckets and the queue stream Corral needs: made where they do not exist yet, given
their bounds, and made again after a NATS restart that lost them (`Reopener`).

What survives a NATS restart (`ensure_buckets`): the fleet queue holds clients' requests and the
models bucket holds load markers and the model index, so both are kept in files. The agents bucket,
the views and the sessions are rewritten by their owners (agents heartbeat and re-announce on
reconnect; the aggregator rewrites views on every change; a lost session only costs a cold prompt
cache), so memory storage is enough for them and keeps their frequent writes off the disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from corral.protocol.subjects import Subjects
from corral.runtime.nats import NatsRefused, NoFleet, denied_js_create, error_text
from corral.runtime.tasks import cancel_and_wait, supervise
from corral.runtime.workqueue import (
    NO_PEERS,
    STREAM_NAME_IN_USE,
    STREAM_NOT_FOUND,
    UNAVAILABLE,
    QueueLimits,
    ensure_stream,
)
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.errors import Error as JetStreamError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

START_PATIENCE_S = 60.0  # a starting service asks JetStream that does not answer yet this long


@dataclass(frozen=True)
class Buckets:
    agents: KeyValue
    models: KeyValue  # registry: model index (``model.*``) and load markers (``loading.*``)
    sessions: KeyValue
    views: KeyValue
    policy: KeyValue  # the gateways' model aliases and fallbacks, written by the operator


@dataclass(frozen=True)
class BucketSpec:
    """How one KV bucket is kept, and how much of the JetStream store it may take: the buckets
    share that store with each other and with the queue, so none may grow with what clients send.
    ``evict``: when full, a put drops the oldest entry (a cache); otherwise it fails, and the
    writer logs it."""

    storage: StorageType
    max_bytes: int
    ttl: float | None = None
    evict: bool = False


MiB = 1 << 20

# nats-server reserves a bucket's whole max_bytes in its store when the bucket is made, so the
# memory buckets of one fleet take 36 MiB of `max_memory_store` up front. An agent's value is a few
# KiB (16 MiB holds thousands of agents), a view at most one NATS message; sessions, one small entry
# per conversation (clients choose how many), are a cache that forgets its oldest entries when full.
# nats-server holds each entry in about 0.6 KiB of memory, 8 times its stored size (`bench.sessions`):
# 4 MiB keeps about 52,000 conversations, far more than the agents' prompt caches can still hold,
# in about 32 MiB of nats-server's memory.
BUCKETS: dict[str, BucketSpec] = {
    "agents": BucketSpec(StorageType.MEMORY, 16 * MiB),  # rewritten every heartbeat
    "models": BucketSpec(StorageType.FILE, 256 * MiB),  # index and load markers
    "sessions": BucketSpec(StorageType.MEMORY, 4 * MiB, ttl=3600.0, evict=True),  # a cache
    "views": BucketSpec(StorageType.MEMORY, 16 * MiB),  # rewritten on every change
    "policy": BucketSpec(StorageType.FILE, 1 * MiB),  # one small record that people write
}

# The gateway's API keys, opened by the gateways and `corral keys` only (`corral.gateway.keys`), all on
# disk: the key records (hashes, never keys; a put past the bound fails); usage per key, model and
# hour or day, kept 35 days and forgetting its oldest entries when full; each key's counts in the
# current minute, kept two minutes (a bucket's TTL applies to every entry in it).
KEY_BUCKETS: dict[str, BucketSpec] = {
    "keys": BucketSpec(StorageType.FILE, 16 * MiB),
    "usage": BucketSpec(StorageType.FILE, 256 * MiB, ttl=35 * 86400.0, evict=True),
    "limits": BucketSpec(StorageType.FILE, 64 * MiB, ttl=120.0, evict=True),
}

# The Batch API's stores (`corral.gateway.batch.store`), made by the first gateway that is sent a
# file (nats-server reserves each bound in its file store when a stream is made, so a fleet that never
# uses batches reserves nothing), all on disk since a batch must outlive a restart of every process
# and of nats-server: the files (an object store: uploads and output files), one record per batch,
# each line's result until its batch is finished, and the lines waiting to run (a work-queue
# stream). None forgets: a write past a bound fails, and the client is told, or the line runs again.
BATCH_STORES: dict[str, BucketSpec] = {
    "files": BucketSpec(StorageType.FILE, 1024 * MiB),
    "batches": BucketSpec(StorageType.FILE, 32 * MiB),
    "batchresults": BucketSpec(StorageType.FILE, 512 * MiB),
    "batchlines": BucketSpec(StorageType.FILE, 512 * MiB),
}


async def ensure_buckets(
    js: JetStreamContext,
    subjects: Subjects,
    *,
    replicas: int = 1,
    queue: QueueLimits | None = None,
    specs: dict[str, BucketSpec] | None = None,
    change_queue: bool = True,
    setup: bool = False,
) -> Buckets:
    """Open the KV buckets and the overflow queue's stream, creating what does not exist yet
    (idempotent across services; safe to call again after a NATS restart). ``queue``: the queue's
    limits, which whoever enqueues (the gateway) enforces; None leaves an existing stream as it is.
    A bucket that exists with other limits than its `BucketSpec` (``specs``, `BUCKETS` by default)
    is given them. ``change_queue`` False gives ``queue`` only to a queue stream made anew (see
    `ensure_stream`). An identity without stream-admin rights (``corral auth``) only opens what the
    admin identity created: a missing bucket or stream raises, other limits are logged and kept.
    ``setup``: the operator's setup step, which also turns rollups off on buckets made before
    (`open_bucket`)."""
    specs = BUCKETS | (specs or {})

    async def bucket(kind: str, name: str) -> KeyValue:
        return await open_bucket(js, name, specs[kind], replicas=replicas, setup=setup)

    try:
        await ensure_stream(js, subjects, limits=queue, replicas=replicas, change=change_queue)
    except (NatsError, JetStreamError, TimeoutError) as e:
        if queue is None:
            raise
        # an identity without stream-admin rights (``corral auth``) cannot set the queue's limits:
        # whoever administers JetStream does; the queue keeps the limits it has
        log.warning("cannot give the queue stream its limits (%s): it keeps those it has", error_text(e))
        await ensure_stream(js, subjects, limits=None, replicas=replicas)
    return Buckets(
        agents=await bucket("agents", subjects.agents_bucket),
        models=await bucket("models", subjects.models_bucket),
        sessions=await bucket("sessions", subjects.sessions_bucket),
        views=await bucket("views", subjects.views_bucket),
        policy=await bucket("policy", subjects.policy_bucket),
    )


async def ensure_buckets_at_start(
    js: JetStreamContext,
    subjects: Subjects,
    *,
    replicas: int = 1,
    queue: QueueLimits | None = None,
    setup: bool = False,
) -> Buckets:
    """`ensure_buckets` for a service that starts. JetStream that does not answer yet is asked again,
    backing off, for up to `START_PATIENCE_S`: services started together on a cluster that has just
    formed create their replicated streams at once, and most time out (or find no peers) while the
    first are placed; a leader being elected does the same. Any other error is raised at once."""
    deadline = time.monotonic() + START_PATIENCE_S
    delay = 0.2
    while True:
        try:
            return await ensure_buckets(js, subjects, replicas=replicas, queue=queue, setup=setup)
        except (TimeoutError, JetStreamError) as e:
            if (denial := denied_js_create()) is not None:  # no answer is coming: NATS said why
                raise NatsRefused(
                    f"NATS denied this identity the fleet's buckets and queue stream ({denial}): with "
                    "NATS identities only the operator may make them; run `corral status` (the setup "
                    "step) with the operator's credentials first"
                ) from e
            if not _not_yet(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("JetStream does not answer yet (%s): asking again in %.1fs", error_text(e), delay)
            await asyncio.sleep(delay)  # a backoff between attempts, not a wait for an event
            delay = min(delay * 2, 5.0)


def _not_yet(e: BaseException) -> bool:
    """Whether ``e`` says JetStream does not answer yet (a timeout, "temporarily unavailable", no
    peers for placement), rather than no: "no responders" (no JetStream on that server at all) is
    raised at once. So is "stream not found" just after a create (a new meta leader that has not
    applied it yet): the next attempt opens the stream, or makes it again."""
    if isinstance(e, (TimeoutError, BucketNotFoundError)):
        return True
    return isinstance(e, APIError) and e.err_code in (UNAVAILABLE, NO_PEERS, STREAM_NOT_FOUND)


async def open_bucket(
    js: JetStreamContext, name: str, spec: BucketSpec, *, replicas: int = 1, setup: bool = False
) -> KeyValue:
    """Open KV bucket ``name``, creating it as ``spec`` says when it does not exist, and giving an
    existing one the spec's bounds where it has others (logged and kept when this identity has no
    stream-admin rights). Rollups go off on a bucket made here, and with ``setup`` (the operator's
    `corral status`) on one made before: a service does not try, so one whose identity may not
    change streams does not wait out a refused change at every start after an upgrade."""
    made = False
    try:
        kv = await js.key_value(name)
    except BucketNotFoundError:
        made = True
        cfg = KeyValueConfig(
            bucket=name,
            history=1,
            ttl=spec.ttl,
            storage=spec.storage,
            replicas=replicas,
            max_bytes=spec.max_bytes,
        )
        try:
            kv = await js.create_key_value(cfg)
        except APIError as e:
            if e.err_code != STREAM_NAME_IN_USE:
                raise
            # another service made it meanwhile (and may have given it its spec already, which a
            # create with another configuration is refused): open theirs
            kv = await js.key_value(name)
    await _hold_to(js, f"KV_{name}", spec, no_rollups=made or setup)
    return kv


async def _hold_to(js: JetStreamContext, stream: str, spec: BucketSpec, *, no_rollups: bool) -> None:
    """Give a bucket's stream the spec's size bound and discard policy, where it has others (a
    bucket made by an older version, or by a service with other specs), and no rollups: a put with
    a ``Nats-Rollup: all`` header would delete every other key of the bucket, and whoever may
    write one key (an agent, its own state) could so wipe everyone's. Nothing of the fleet purges
    a key (a KV purge is such a rollup); deletes are markers of their own."""
    cfg = (await js.stream_info(stream)).config
    discard = DiscardPolicy.OLD if spec.evict else DiscardPolicy.NEW
    rollups = False if no_rollups else cfg.allow_rollup_hdrs
    if (cfg.max_bytes, cfg.discard, cfg.allow_rollup_hdrs) != (spec.max_bytes, discard, rollups):
        try:
            await js.update_stream(
                replace(cfg, max_bytes=spec.max_bytes, discard=discard, allow_rollup_hdrs=rollups)
            )
        except (NatsError, JetStreamError, TimeoutError) as e:  # no stream-admin rights (`corral auth`)
            log.warning(
                "cannot give bucket stream %s its limits (%s): it keeps those it has", stream, error_text(e)
            )


async def require_fleet(js: JetStreamContext, subjects: Subjects) -> None:
    """Raise `NoFleet` unless the fleet's agents bucket exists: a command that only reads or
    changes a fleet must not make the stores of a root nobody runs."""
    try:
        await js.key_value(subjects.agents_bucket)
    except BucketNotFoundError:
        raise NoFleet(subjects.root) from None


def is_missing(e: BaseException) -> bool:
    """Whether a KV or stream call failed because its bucket or stream is gone (a restarted NATS
    that kept it in memory) or JetStream is not up yet: creating them again is the cure."""
    return isinstance(e, (BucketNotFoundError, NotFoundError, NoStreamResponseError, ServiceUnavailableError))


class Reopener:
    """Ensures the buckets and the queue stream again whenever asked — after every reconnect
    (``connect(on_reconnected=reopener.request)``) and when a call finds one missing (`is_missing`)
    — then calls ``reopened`` (the owner restarts its watches there). The `KeyValue` handles of the
    first `ensure_buckets` stay valid: a bucket created again has the same name and stream.

    `start` runs its loop under `corral.runtime.tasks.supervise`: an ensure that fails is asked for
    again and raised, so the supervisor logs it and retries after its backoff."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        reopened: Callable[[], object],
        *,
        replicas: int = 1,
        queue: QueueLimits | None = None,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._reopened = reopened
        self._replicas = replicas
        self._queue = queue  # the queue's limits, enforced by whoever enqueues (see `ensure_stream`)
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(supervise("reopen buckets", self._run), name="reopen-buckets")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    def request(self) -> None:
        """Ensure again soon (cheap; safe from nats-py's callbacks: it waits on nothing)."""
        self._wanted.set()

    def missing(self, e: BaseException) -> bool:
        """`request` when ``e`` says a bucket or stream is gone; returns whether it did."""
        if is_missing(e):
            log.warning("a bucket or stream is missing (%s): creating them again", type(e).__name__)
            self.request()
            return True
        return False

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await ensure_buckets(
                    self._nc.jetstream(),
                    self._subjects,
                    replicas=self._replicas,
                    queue=self._queue,
                    change_queue=False,  # set at start; a reconnect only makes the stream again
                )
            except (NatsError, JetStreamError, TimeoutError):
                self._wanted.set()  # the supervisor retries after its backoff
                raise
            self._reopened()


async def kv_create(kv: KeyValue, key: str, value: bytes) -> int:
    """``kv.create(key, value)``: the new revision, or `KeyWrongLastSequenceError` when the key
    exists. nats-py's create, refused for a key that exists, reads it back to tell a deleted one; on
    a cluster that read may reach a replica that has not seen the key yet and say it is not found:
    that too means someone created it a moment ago."""
    try:
        return await kv.create(key, value)
    except KeyNotFoundError as e:
        raise KeyWrongLastSequenceError(description=f"key {key} was created meanwhile") from e
