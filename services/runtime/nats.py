"""Connect to NATS and make sure the JetStream buckets Corral needs exist.

A connection reconnects for ever, with a capped, jittered backoff between attempts, and logs
its errors at most once per `ERROR_LOG_EVERY_S`. A connection that nats-py closes for good
(the server closed it for a protocol or authorization error) calls ``on_closed``: each service's
``serve`` waits on that beside its stop signal and exits non-zero, so its supervisor restarts it
instead of leaving a process up that answers nothing.

What survives a NATS restart (`ensure_buckets`): the fleet queue holds clients' requests and the
models bucket holds load markers and the model index, so both are kept in files. The agents bucket,
the views and the sessions are rewritten by their owners (agents heartbeat and re-announce on
reconnect; the aggregator rewrites views on every change; a lost session only costs a cold prompt
cache), so memory storage is enough for them and keeps their frequent writes off the disk.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from corral.protocol.subjects import Subjects
from corral.runtime.natsauth import NatsAuth as NatsAuth  # callers take it from here, beside connect
from corral.runtime.tasks import cancel_and_wait, supervise
from corral.runtime.workqueue import STREAM_NAME_IN_USE, QueueLimits, ensure_stream
from nats.aio.client import Client as NATS
from nats.aio.client import Server
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.errors import Error as JetStreamError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

RECONNECT_FIRST_S = 0.25  # the wait before the second attempt to reach a server that went away
RECONNECT_MAX_S = 2.0  # the backoff's cap: a restarted server is found again within this
ERROR_LOG_EVERY_S = 10.0  # the same connection error is logged at most this often
START_PATIENCE_S = 60.0  # a starting service asks JetStream that does not answer yet this long
NO_PEERS = 10005  # JetStream's "no suitable peers for placement": a cluster still forming
UNAVAILABLE = 10008  # JetStream's "system temporarily unavailable": a leader being elected


def reconnect_delay(attempts: int, *, rng: random.Random | None = None) -> float:
    """The wait before reconnect attempt ``attempts + 1``: doubling from `RECONNECT_FIRST_S`,
    capped at `RECONNECT_MAX_S`, with jitter (a half to the whole of it) so a fleet that lost its
    server does not come back in lockstep."""
    if attempts <= 0:
        return 0.0
    full = min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** (attempts - 1))
    return float(full * (0.5 + 0.5 * (rng or random).random()))


def _next_server(servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
    """nats-py's reconnect hook: the least-tried server, after its backoff."""
    server = min(servers, key=lambda s: s.reconnects)
    return server, reconnect_delay(server.reconnects)


class _RateLimitedLog:
    """Logs an error at once, then at most one every `ERROR_LOG_EVERY_S` (saying how many were held
    back): a server that is away is one line every few seconds, not one per reconnect attempt."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._last: float | None = None
        self._held = 0

    def __call__(self, e: Exception) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < ERROR_LOG_EVERY_S:
            self._held += 1
            return
        more = f" ({self._held} more errors since the last one logged)" if self._held else ""
        log.warning("%s: NATS error: %s%s", self.name, str(e) or type(e).__name__, more)
        self._last, self._held = now, 0


def server_urls(url: str) -> list[str]:
    """The servers of a NATS URL setting: one URL, or several comma-separated (the nodes of a
    cluster, ``nats://a:4222,nats://b:4222``); blanks around and between them are dropped. nats-py
    takes the list as its server pool and moves on to the next server when one goes away."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ValueError("no NATS server URL given")
    return servers


class NatsRefused(ConnectionError):
    """The NATS server refused this process's first connection for a reason retrying cannot cure:
    its identity is not authorized, or the server's certificate does not verify. A service exits
    with status 1 and says so; a later refusal (an identity revoked while connected) closes the
    connection for good instead (``on_closed``)."""


def refused_for_good(e: BaseException) -> bool:
    """Whether a first-connection error is one retrying cannot cure (see `NatsRefused`)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return True
    text = str(e).lower()
    return "authorization violation" in text or "authentication" in text


async def connect(
    url: str,
    *,
    name: str,
    on_closed: Callable[[], object] | None = None,
    on_reconnected: Callable[[], object] | None = None,
    auth: NatsAuth | None = None,
) -> NATS:
    """A connection that reconnects for ever and reports state changes in the log; `NatsRefused`
    when the server refuses the first connection for good (see there).

    ``url`` is one server or a comma-separated list of them (`server_urls`); ``auth`` this process's
    identity and TLS files (`NatsAuth.of(settings)`; raises `CredentialsError` for a bad one).

    ``on_closed`` is called once the connection is closed, by us or for good by nats-py;
    ``on_reconnected`` after every reconnect (a restarted server may have lost what lived in
    memory: the caller wakes its own loops to ensure its buckets and restart its watches — the
    callback runs inside nats-py's reconnect, so it must not wait on NATS itself)."""

    nc = NATS()
    connected = False
    error_log = _RateLimitedLog(name)

    async def on_disconnect() -> None:
        if nc.is_closed or nc.is_draining:
            log.debug("%s: NATS connection closed", name)
        else:
            log.warning("%s: disconnected from NATS", name)

    got_past: BaseException | None = None  # the last error a reconnect got past: no cause of a close

    async def on_reconnect() -> None:
        nonlocal got_past
        got_past = nc.last_error
        log.info("%s: reconnected to NATS", name)
        if on_reconnected is not None:
            on_reconnected()

    async def on_error(e: Exception) -> None:
        error_log(e)
        if not connected and refused_for_good(e):
            # raised inside nats-py's first connect, which it ends: retrying cannot help
            raise NatsRefused(f"NATS at {url} refused this process: {e}") from e

    told = False

    async def on_close() -> None:
        nonlocal told
        if told:
            return
        told = True
        if connected and nc.last_error is not None and nc.last_error is not got_past:
            log.error("%s: NATS connection closed for good: %s", name, nc.last_error)
        if on_closed is not None:
            on_closed()

    options: dict[str, Any] = dict(
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=RECONNECT_MAX_S,  # nats-py's own wait, only used while closing
        reconnect_to_server_handler=_next_server,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
        closed_cb=on_close,
        drain_timeout=5,  # bounded: a stop never waits longer than this for subscriptions to drain
        **(auth.options() if auth is not None else {}),
    )
    try:
        await nc.connect(server_urls(url), **options)
    except NatsRefused:
        await nc.close()  # the refused attempt's socket
        raise
    connected = True
    got_past = nc.last_error  # a server of the list that refused before another took us: no cause
    _decode_leniently(nc)  # before any subscription: any client may publish to our subjects
    _close_reliably(nc, on_close)
    return nc


def _close_reliably(nc: NATS, on_close: Callable[[], Awaitable[None]]) -> None:
    """Make sure ``on_close`` runs once ``nc`` is closed. nats-py's private ``_close`` marks the
    client closed first, then flushes what is pending to the socket and only at its end calls the
    closed callback: when the server has just reset the connection (it closed it for good, e.g. on
    an authorization violation), that flush raises ``ConnectionResetError`` and the callback never
    runs, so a service would wait on a connection that is gone. This wraps ``_close`` (nats-py 2.16
    and later) to call ``on_close`` itself when ``_close`` fails that way."""
    close = nc._close

    async def guarded(status: int, do_cbs: bool = True) -> None:
        try:
            await close(status, do_cbs)
        except OSError as e:  # the socket was reset under the final flush: closed all the same
            if not (do_cbs and nc.is_closed):
                raise
            log.debug("NATS connection closed with an error: %r", e)
            await on_close()

    nc._close = guarded  # type: ignore[method-assign]


def _decode_leniently(nc: NATS) -> None:
    """Make ``nc`` deliver a message whose subject or reply subject is not UTF-8 with the bad bytes
    replaced (U+FFFD) instead of ending its read loop. nats-py decodes both as strict UTF-8 inside
    that loop: one such message from any client would leave the connection looking open while it
    reads nothing more. Every other message is built as before, at no extra cost; the message still
    reaches its subscription (a single-shot claim sees its one delivery), and a reply subject with
    U+FFFD in it is never a usable one. This wraps nats-py's private ``_build_message``, the one
    place where the decoding happens (nats-py 2.16 and later)."""
    build = nc._build_message

    def lenient(sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> Any:
        try:
            return build(sid, subject, reply, data, headers)
        except UnicodeDecodeError:
            log.warning("a message on %r has a subject or reply subject that is not UTF-8", subject[:80])
            return build(sid, _utf8(subject), _utf8(reply), data, headers)

    nc._build_message = lenient  # type: ignore[method-assign]


def _utf8(raw: bytes) -> bytes:
    return raw.decode("utf-8", "replace").encode()


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
) -> Buckets:
    """Open the KV buckets and the overflow queue's stream, creating what does not exist yet
    (idempotent across services; safe to call again after a NATS restart). ``queue``: the queue's
    limits, which whoever enqueues (the gateway) enforces; None leaves an existing stream as it is.
    A bucket that exists with other limits than its `BucketSpec` (``specs``, `BUCKETS` by default)
    is given them. An identity without stream-admin rights (``corral auth``) only opens what the
    admin identity created: a missing bucket or stream raises, other limits are logged and kept."""
    specs = BUCKETS | (specs or {})

    async def bucket(kind: str, name: str) -> KeyValue:
        return await open_bucket(js, name, specs[kind], replicas=replicas)

    try:
        await ensure_stream(js, subjects, limits=queue, replicas=replicas)
    except (NatsError, JetStreamError, TimeoutError) as e:
        if queue is None:
            raise
        # an identity without stream-admin rights (``corral auth``) cannot set the queue's limits:
        # whoever administers JetStream does; the queue keeps the limits it has
        log.warning("cannot give the queue stream its limits (%r): it keeps those it has", e)
        await ensure_stream(js, subjects, limits=None, replicas=replicas)
    return Buckets(
        agents=await bucket("agents", subjects.agents_bucket),
        models=await bucket("models", subjects.models_bucket),
        sessions=await bucket("sessions", subjects.sessions_bucket),
        views=await bucket("views", subjects.views_bucket),
        policy=await bucket("policy", subjects.policy_bucket),
    )


async def ensure_buckets_at_start(
    js: JetStreamContext, subjects: Subjects, *, replicas: int = 1, queue: QueueLimits | None = None
) -> Buckets:
    """`ensure_buckets` for a service that starts. JetStream that does not answer yet is asked again,
    backing off, for up to `START_PATIENCE_S`: services started together on a cluster that has just
    formed create their replicated streams at once, and most time out (or find no peers) while the
    first are placed; a leader being elected does the same. Any other error is raised at once."""
    deadline = time.monotonic() + START_PATIENCE_S
    delay = 0.2
    while True:
        try:
            return await ensure_buckets(js, subjects, replicas=replicas, queue=queue)
        except (TimeoutError, JetStreamError) as e:
            if not _not_yet(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("JetStream does not answer yet (%r): asking again in %.1fs", e, delay)
            await asyncio.sleep(delay)  # a backoff between attempts, not a wait for an event
            delay = min(delay * 2, 5.0)


def _not_yet(e: BaseException) -> bool:
    """Whether ``e`` says JetStream does not answer yet (a timeout, "temporarily unavailable", no
    peers for placement), rather than no: "no responders" (no JetStream on that server at all) is
    raised at once."""
    if isinstance(e, TimeoutError):
        return True
    return isinstance(e, APIError) and e.err_code in (UNAVAILABLE, NO_PEERS)


async def open_bucket(js: JetStreamContext, name: str, spec: BucketSpec, *, replicas: int = 1) -> KeyValue:
    """Open KV bucket ``name``, creating it as ``spec`` says when it does not exist, and giving an
    existing one the spec's bounds where it has others (logged and kept when this identity has no
    stream-admin rights)."""
    try:
        kv = await js.key_value(name)
    except BucketNotFoundError:
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
    await _hold_to(js, f"KV_{name}", spec)
    return kv


async def _hold_to(js: JetStreamContext, stream: str, spec: BucketSpec) -> None:
    """Give a bucket's stream the spec's size bound and discard policy, where it has others (a
    bucket made by an older version, or by a service with other specs)."""
    cfg = (await js.stream_info(stream)).config
    discard = DiscardPolicy.OLD if spec.evict else DiscardPolicy.NEW
    if (cfg.max_bytes, cfg.discard) != (spec.max_bytes, discard):
        try:
            await js.update_stream(replace(cfg, max_bytes=spec.max_bytes, discard=discard))
        except (NatsError, JetStreamError, TimeoutError) as e:  # no stream-admin rights (`corral auth`)
            log.warning("cannot give bucket stream %s its limits (%r): it keeps those it has", stream, e)


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
                    self._nc.jetstream(), self._subjects, replicas=self._replicas, queue=self._queue
                )
            except (NatsError, JetStreamError, TimeoutError):
                self._wanted.set()  # the supervisor retries after its backoff
                raise
            self._reopened()


async def round_trip(nc: NATS, timeout: float) -> bool:
    """A barrier: True once the server has read everything sent here before the call, and all it
    sent before that has been read here; False when that is not known within ``timeout``.

    Not `nats.aio.client.Client.flush`, which nats-py 2.16 gets wrong twice: its PING is written
    straight to the socket, ahead of commands still buffered (so it can return before the server has
    read a SUB sent just before), and it cancels its PONG's future on a timeout or when its caller is
    cancelled but leaves it queued, so the late PONG ends the read loop (``InvalidStateError``) and
    the connection reads nothing more. Here the buffer is written out first, then the PING; the
    future is only waited on, never cancelled: a late PONG completes it, a reconnect forgets it."""
    if not nc.is_connected:
        return False  # nothing is read or answered meanwhile
    written = asyncio.create_task(nc._flush_pending(force_flush=True))  # returns once written
    done, _ = await asyncio.wait([written], timeout=timeout)
    if not done:
        written.cancel()  # nats-py's flush loop stopped (the connection is down): nothing to wait for
        return False
    if not nc.is_connected:
        return False
    pong = asyncio.get_running_loop().create_future()
    await nc._send_ping(pong)
    try:
        await asyncio.wait_for(asyncio.shield(pong), timeout)  # a timeout cancels the shield only
    except TimeoutError:
        return False
    return True
