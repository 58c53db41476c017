"""The fleet-wide overflow queue: a JetStream work-queue stream of requests no agent can start now.

A gateway that finds every warm slot taken publishes the request, headers and body as they would
go to an agent, on ``{root}.queue.{vendor}.{model}`` (`enqueue`), then sends an empty nudge on
``{root}.queued.{vendor}.{model}`` and waits for a claim on its reply subject as usual. An agent
that frees a slot of a warm model takes the oldest waiting requests of that model (`Puller.take`)
*before* it takes interest in new work again; the nudge wakes agents that had room already. One
durable pull consumer per queue subject is shared by every agent, so each request goes to exactly
one agent, in publish order, whichever gateway queued it.

Bounds (`QueueLimits`): the stream keeps at most ``depth`` requests per subject and ``max_bytes``
in all (a full queue answers Ollama's 503 at once, like ``OLLAMA_MAX_QUEUE``; a body too large for
one message stays with its gateway and only its headers wait here); every request carries its deadline, and an agent drops (acks
without running) one whose deadline passed; the stream's ``max_age`` bounds anything left behind.
A gateway that gives up on a request it queued (deadline, client gone) deletes it by sequence.

Batch-priority requests wait in a lane of their own, ``{root}.queue.batch.{vendor}.{model}``, in
the same stream; agents take it only when the interactive lane is empty (`corral.agent.claims`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

from corral.protocol import headers as H
from corral.protocol.priority import INTERACTIVE, Priority
from corral.protocol.subjects import Subjects
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError

log = logging.getLogger(__name__)

# JetStream's error codes this package tells apart
NO_PEERS = 10005  # "no suitable peers for placement": a cluster still forming
UNAVAILABLE = 10008  # "system temporarily unavailable": a leader being elected
STREAM_NAME_IN_USE = 10058  # a stream of that name exists (other config)
STREAM_NOT_FOUND = 10059  # "stream not found": on a new cluster, also just after a create
# JetStream's "message delete failed" (HTTP-like code 500); with this description the message is
# no longer in the stream: an agent took (acked) it, or another withdrawal removed it, first
MSG_DELETE_FAILED = 10057
NO_MESSAGE = "no message found"

DEFAULT_DEPTH = 512  # requests waiting per model and vendor subject (Ollama's OLLAMA_MAX_QUEUE)
DEFAULT_MAX_BYTES = 1 << 30  # the whole queue, on disk
MAX_AGE_S = 3600.0  # nothing waits longer than this, whatever its deadline said (a leftover's bound)
ACK_WAIT_S = 30.0
_STATUS = "Status"  # nats-py puts a status line (404 no messages, 408 timeout ...) under this header


class QueueFull(Exception):
    """The queue for this model is at its depth limit, or the whole queue at its size limit."""


@dataclass(frozen=True)
class QueueLimits:
    """What the queue may hold: requests per model and vendor subject, and bytes in all."""

    depth: int = DEFAULT_DEPTH
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class Queued:
    """A request waiting in the stream: what is needed to withdraw it."""

    stream: str
    seq: int


async def ensure_stream(
    js: JetStreamContext,
    subjects: Subjects,
    *,
    limits: QueueLimits | None = None,
    replicas: int = 1,
    change: bool = True,
) -> None:
    """Create the queue stream if it does not exist (idempotent across services; the first wins;
    safe to call again after a NATS restart).

    ``limits``: a new stream's; with ``change`` an existing stream is given them too (logged, as
    they hold for every gateway) — the gateway passes its settings when it starts, and only to
    create the stream again after a reconnect, so gateways set differently do not take turns at
    every NATS restart. Other services pass None and leave an existing stream as it is. The stream
    is kept in files: it holds clients' requests, which must outlive a NATS restart.
    """
    try:
        info = await js.stream_info(subjects.queue_stream)
    except NotFoundError:
        info = None
    if info is not None:
        cfg = info.config
        age = _kept_for(cfg.max_age)
        if (
            change
            and limits is not None
            and (cfg.max_msgs_per_subject, cfg.max_bytes, cfg.max_age)
            != (limits.depth, limits.max_bytes, age)
        ):
            if (cfg.max_msgs_per_subject, cfg.max_bytes) != (limits.depth, limits.max_bytes):
                log.warning(
                    "the fleet queue's limits change from %d requests per model and %d bytes to %d and %d "
                    "(this gateway's settings), for every gateway",
                    cfg.max_msgs_per_subject,
                    cfg.max_bytes,
                    limits.depth,
                    limits.max_bytes,
                )
            await js.update_stream(
                replace(cfg, max_msgs_per_subject=limits.depth, max_bytes=limits.max_bytes, max_age=age)
            )
        return
    limits = limits or QueueLimits()
    cfg = StreamConfig(
        name=subjects.queue_stream,
        subjects=[subjects.queue_all],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        max_msgs_per_subject=limits.depth,
        max_bytes=limits.max_bytes,
        max_age=MAX_AGE_S,
    )
    try:
        await js.add_stream(cfg)
    except APIError as e:
        if e.err_code != STREAM_NAME_IN_USE:  # a sibling service created it first
            raise


async def keep_long_enough(js: JetStreamContext, subjects: Subjects) -> bool:
    """Give an existing queue stream made by an older version (its requests aged out after ten
    minutes) `MAX_AGE_S`, leaving its other limits; True when it was changed. For the operator's
    setup step: with NATS identities no other service may change the stream."""
    cfg = (await js.stream_info(subjects.queue_stream)).config
    if (age := _kept_for(cfg.max_age)) != cfg.max_age:
        await js.update_stream(replace(cfg, max_age=age))
        return True
    return False


def _kept_for(max_age: float | None) -> float | None:
    """The queue stream's age limit given its current one: at least `MAX_AGE_S`; a longer one, or
    none (0 or None: for ever), as an operator set it."""
    if not max_age or max_age >= MAX_AGE_S:
        return max_age
    return MAX_AGE_S


async def enqueue(
    nc: NATS,
    js: JetStreamContext,
    subjects: Subjects,
    vendor: str,
    token: str,
    payload: bytes,
    headers: dict[str, str],
    priority: Priority = INTERACTIVE,
) -> Queued:
    """Append one request to ``priority``'s lane; raises `QueueFull` at the depth limit (per lane).
    ``headers`` must carry H.REPLY. The nudge is the same for both lanes."""
    try:
        subject = subjects.queue(vendor, token, priority)
        ack = await js.publish(subject, payload, headers=headers, timeout=2.0)
    except APIError as e:
        if any(full in (e.description or "") for full in ("maximum messages", "maximum bytes")):
            raise QueueFull() from None
        raise
    await nc.publish(subjects.queued(vendor, token), b"")
    return Queued(ack.stream, ack.seq)


def already_gone(e: APIError) -> bool:
    """Whether a failed delete of a queued message says it is no longer there (taken or expired):
    JetStream answers that as not found, or as a failed delete with `NO_MESSAGE` when an agent
    acked it between the request's cancellation and its withdrawal, which many cancellations at
    once (a shutdown, a burst of clients going away) make common."""
    return isinstance(e, NotFoundError) or (e.err_code == MSG_DELETE_FAILED and e.description == NO_MESSAGE)


async def withdraw(js: JetStreamContext, queued: Queued) -> bool:
    """Remove a request nobody has taken yet; False when an agent already took it (or it expired),
    or when it could not be removed (logged)."""
    try:
        return bool(await js.delete_msg(queued.stream, queued.seq))
    except APIError as e:
        if already_gone(e):
            log.debug(
                "queued request %s/%d was taken before its withdrawal: %s", queued.stream, queued.seq, e
            )
        else:
            log.warning("cannot withdraw queued request %s/%d: %s", queued.stream, queued.seq, e)
        return False
    except (NatsError, TimeoutError) as e:
        log.warning("cannot withdraw queued request %s/%d: %r", queued.stream, queued.seq, e)
        return False


async def still_queued(js: JetStreamContext, queued: Queued) -> bool | None:
    """Whether ``queued`` still waits in the stream: False once an agent took it (or it expired),
    None when the stream did not say (logged)."""
    try:
        await js.get_msg(queued.stream, queued.seq)
        return True
    except APIError as e:
        if already_gone(e):
            return False
        log.warning("cannot read queued request %s/%d: %s", queued.stream, queued.seq, e)
    except (NatsError, TimeoutError) as e:
        log.warning("cannot read queued request %s/%d: %r", queued.stream, queued.seq, e)
    return None


class Reader(NamedTuple):
    """Where a queue subject's reader (its durable consumer) stands, as JetStream says."""

    delivered: int  # the stream sequence of the last request it handed out (0: none yet)
    pending: int | None  # requests it still has to hand out; None: it does not exist yet

    def passed(self, seq: int) -> bool:
        """Whether it will never hand out the request at stream sequence ``seq``, asked after that
        request was stored, if the stream still holds it: it handed out requests at or past it, or
        it counts nothing left to hand out (the request is behind it)."""
        return self.delivered >= seq or self.pending == 0


async def reader_position(
    js: JetStreamContext, subjects: Subjects, subject: str, *, timeout: float
) -> Reader | None:
    """Where the reader of queue ``subject`` (its durable consumer) stands (`Reader`; delivered 0
    and pending None before it exists: an agent creates it at its first take). None when nothing
    answered within ``timeout``, or JetStream said it cannot now: a cluster that lost the node
    leading the consumer, or its own meta leader, elects another first (seconds), and until then no
    agent can take what waits there, though the stream may still take requests.

    A request still in the stream that the reader has passed (`Reader.passed`) is one it will never
    hand out. Two ways are known: a nats-server killed outright can come back with its consumer's
    position saved but the removal of what that consumer handed out lost; and nats-server (2.15
    here) can move a work-queue consumer past a request stored while a consumer-info request (this
    one, or a KEDA scaler's) races the deletion of the requests before it."""
    try:
        info = await js.consumer_info(subjects.queue_stream, consumer_name(subject), timeout=timeout)
    except NotFoundError:
        return Reader(0, None)
    except (APIError, NatsError, TimeoutError) as e:
        log.warning("the reader of queue %s does not answer: %r", subject, e)
        return None
    delivered = (info.delivered.stream_seq or 0) if info.delivered is not None else 0
    return Reader(delivered, info.num_pending)


async def depths(nc: NATS, subjects: Subjects) -> dict[str, int]:
    """Requests waiting per queue subject (``{root}.queue.{vendor}.{token}`` → count); none known
    while the connection is down (not a JetStream call left to time out: a status page or a scrape
    answers at once)."""
    if not nc.is_connected:
        return {}
    try:
        info = await nc.jetstream().stream_info(subjects.queue_stream, subjects_filter=subjects.queue_all)
    except NotFoundError:
        return {}  # no queue stream yet: nothing waits
    except (NatsError, TimeoutError) as e:
        log.warning("cannot read the queue's depths: %r", e)
        return {}
    return {s: n for s, n in (info.state.subjects or {}).items() if n}


def consumer_name(subject: str) -> str:
    """A durable consumer name for one queue subject (names may not contain ``.`` or ``/``)."""
    return "q_" + hashlib.blake2b(subject.encode(), digest_size=10).hexdigest()


class Puller:
    """An agent's side: take the oldest waiting requests of a queue subject, without waiting."""

    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._subjects = subjects
        self._ready: set[str] = set()  # queue subjects whose consumer exists

    async def _ensure(self, subject: str, timeout: float) -> None:
        if subject in self._ready:
            return
        cfg = ConsumerConfig(
            durable_name=consumer_name(subject),
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_S,
            max_ack_pending=-1,
            max_waiting=4096,
        )
        await self._js.add_consumer(self._subjects.queue_stream, cfg, timeout=timeout)
        self._ready.add(subject)

    async def take(self, subject: str, n: int, *, timeout: float = 2.0) -> list[Msg]:
        """Up to ``n`` waiting requests from ``subject``, oldest first (see `take_batch`)."""
        return (await self.take_batch(subject, n, timeout=timeout))[0]

    async def take_batch(self, subject: str, n: int, *, timeout: float = 2.0) -> tuple[list[Msg], bool]:
        """(up to ``n`` waiting requests from ``subject``, oldest first, each already acknowledged
        — taken off the queue; whether the queue said it had no more). Expired and poison requests
        are dropped, not returned; when a pull brought only those it pulls again, so an empty list
        with ``False`` means the queue did not answer (logged), never that the queue may hold more
        behind what was dropped.
        """
        if n <= 0:
            return [], False
        again = True
        while True:
            try:
                await self._ensure(subject, timeout)
            except (NatsError, TimeoutError) as e:
                log.warning("cannot open queue consumer for %s: %s", subject, e)
                return [], False
            got, drained = await self._pull(subject, n, timeout)
            if not got and subject not in self._ready and again:
                again = False  # its consumer was gone (`_pull`): made again, and asked again once
                continue
            fresh = await _admit(got)
            if fresh or drained or not got:
                return fresh, drained

    async def _pull(self, subject: str, n: int, timeout: float) -> tuple[list[Msg], bool]:
        """One pull request with ``no_wait`` on its own inbox: the server answers with what waits
        and a 404 status when that is less than ``n`` (delivered messages keep their own subject, so
        only the inbox subscription tells them apart)."""
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        got: list[Msg] = []
        drained = False
        try:
            await self._nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self._subjects.queue_stream}.{consumer_name(subject)}",
                json.dumps({"batch": n, "no_wait": True}).encode(),
                reply=inbox,
            )
            while len(got) < n:
                msg = await sub.next_msg(timeout)
                if msg.headers and _STATUS in msg.headers:
                    drained = msg.headers[_STATUS] == "404"  # 404 no messages; 408 etc.: unknown
                    if msg.headers[_STATUS] == "503":  # no responders: the consumer is gone (the
                        # stream was made again: a NATS that lost its state, a deleted stream)
                        self._ready.discard(subject)
                    break
                got.append(msg)
        except (NatsError, TimeoutError) as e:  # no answer in time, or the connection closing
            log.warning("queue %s did not answer: %r", subject, e)
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()
        return got, drained


async def _admit(got: list[Msg]) -> list[Msg]:
    """Acknowledge every pulled request (each is taken off the queue) and keep those still worth
    serving: an expired one was answered 503 by its gateway already, and one whose deadline does
    not parse would fail again on every agent it was redelivered to."""
    now_ms = time.time() * 1000
    fresh = []
    for msg in got:
        deadline = _deadline_ms(msg)
        if deadline is None or (deadline and now_ms > deadline):
            if deadline is None:
                log.warning("dropping a queued request with a bad %s header", H.DEADLINE)
            with contextlib.suppress(NatsError, TimeoutError):
                await msg.ack_sync(timeout=2.0)  # confirmed gone
            continue
        with contextlib.suppress(NatsError):
            await msg.ack()  # taken; the claim that follows tells its gateway
        fresh.append(msg)
    return fresh


def _deadline_ms(msg: Msg) -> int | None:
    """A queued request's deadline (0 = none); None when the header is not a number."""
    raw = (msg.headers or {}).get(H.DEADLINE) or "0"
    return int(raw) if raw.isascii() and raw.isdigit() else None
