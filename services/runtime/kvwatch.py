"""A JetStream key-value watch whose end-of-snapshot marker can be trusted.

A watch (NATS ADR-8) delivers the latest value of every matching key, then a ``None`` marker,
then every later change. Readers lean on that marker: a snapshot read stops at it, and a cache
(the gateway's API keys, the fleet view, the policy) counts itself loaded when it comes.

nats-py's ``KeyValue.watch`` can send the marker before the snapshot has arrived
(nats-io/nats.py#842): it compares the server's count of messages still to send with the number
its own callback has processed, and messages the server has already sent but the client has not
yet handed to that callback are counted by neither. A reader then sees an empty or partial
bucket: ``corral keys usage`` printed an empty table, and a cache could count itself loaded
without a key in it. A lone per-message ``num_pending`` of 0 is no proof either: under
concurrent writes it can reach 0 and rise again.

Here the snapshot's size comes from the server alone: the consumer's messages already delivered
plus those pending when it is first asked (`Catchup`). Every message counts toward it, deletes
and markers a reader asked to skip included, and the marker follows the last of them. Messages
counted there can vanish before they are sent (a purge, an expiry); the marker then follows the
message that reported nothing pending once `SETTLE_S` has passed with no other.

Even the server's count is short when a key is written while the snapshot is sent: the buckets
keep one revision, so the write removes the message the consumer was about to send, and the key
comes only after the marker, as a change. A live watch loses nothing by that. A one-off read
(`snapshot`, `latest_per_subject`) would: it lists the stream's subjects first and fetches any
the consumer did not bring on its own.

A reader is handed a backlog one entry per turn of the event loop: a gateway following a thousand
agents' heartbeats under load would otherwise work through every queued state before serving the
next request (`bench.scale` with 1,000 agents shows it; bench/README.md has the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from corral.runtime.tasks import cancel_and_wait
from nats.js import JetStreamContext, api
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue

SETTLE_S = 1.0
"""How long a watch short of its snapshot's size waits, after a message said nothing more was
pending, before it takes the rest as removed and sends the marker anyway."""

LIVE_INACTIVE_S = 5 * 60.0
"""How long the server keeps a watch's consumer once nobody listens: a live watch's client may be
away for a while and resume. A snapshot's consumer goes after `SNAPSHOT_INACTIVE_S` (read once,
then stopped; kept longer, frequent listings would pile up consumers on the stream)."""
SNAPSHOT_INACTIVE_S = 5.0
SNAPSHOT_WAIT_S = 5.0  # a one-off read's longest wait for the next message, given no timeout
FETCH_AT_ONCE = 64  # subjects a one-off read fetches alone at a time

_QUEUE = 256  # entries a slow reader may lag behind; the subscription waits beyond that

_MARKER_OPS = {"MaxAge": KV_PURGE, "Purge": KV_PURGE, "Remove": KV_DEL}  # nats-server 2.11+ markers

Entry = KeyValue.Entry


@dataclass
class Catchup:
    """When a watch's snapshot is complete; pure state, fed by the watch.

    ``size`` is what the server counted when asked after the consumer began: messages it had
    delivered plus those pending. The snapshot is complete once that many have arrived, or once
    the latest one reported nothing pending and `SETTLE_S` passed with no other (those counted
    were removed before they were sent).
    """

    size: int | None = None  # unknown until the consumer's info is in
    received: int = 0
    drained: bool = False  # the latest message reported nothing pending
    done: bool = False

    def sized(self, size: int) -> bool:
        """The server's count is in; True when that already completes the snapshot."""
        self.size = size
        return self._check()

    def message(self, pending: int) -> bool:
        """One more message, reporting ``pending`` after it; True when it completes the snapshot."""
        self.received += 1
        self.drained = pending == 0
        return self._check()

    def settled(self) -> bool:
        """`SETTLE_S` passed with no message; True when that completes the snapshot."""
        if self.done or self.size is None or not self.drained:
            return False
        self.done = True
        return True

    def _check(self) -> bool:
        if self.done or self.size is None or self.received < self.size:
            return False
        self.done = True
        return True


def operation(headers: dict[str, str] | None) -> str | None:
    """A message's KV operation: None for a value, ``DEL``/``PURGE``, or ``?`` for a marker of a
    reason this version does not know (skipped like nats-py does)."""
    if not headers:
        return None
    if KV_OP in headers:
        return headers[KV_OP]
    if KV_MARKER_REASON in headers:
        return _MARKER_OPS.get(headers[KV_MARKER_REASON], "?")
    return None


class KvWatch:
    """The entries under one key pattern: the snapshot, ``None``, then each change.

    Read with ``async for`` or `updates` (which raises ``nats.errors.TimeoutError`` like
    nats-py's watcher); `stop` ends it and is safe to call twice. Use `watch` to open one.
    """

    def __init__(self, kv: KeyValue, keys: str, *, ignore_deletes: bool, inactive_s: float) -> None:
        # nats-py keeps a bucket's stream, subject prefix and JetStream context private; they
        # are read here and nowhere else (tests/integration/test_kvwatch.py runs this on a server)
        self._kv = kv
        self._subject = f"{kv._pre}{keys}"
        self._ignore_deletes = ignore_deletes
        self._inactive_s = inactive_s
        self._queue: asyncio.Queue[Entry | None] = asyncio.Queue(maxsize=_QUEUE)
        self._catchup = Catchup()
        self._sized = asyncio.Event()
        self._heard = 0.0  # loop time of the latest message (or of the start)
        self._sub: Any = None
        self._stopped = False

    async def start(self) -> None:
        js = self._kv._js
        self._sub = await js.subscribe(
            self._subject,
            stream=self._kv._stream,
            cb=self._on_message,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=self._inactive_s,
        )
        try:
            info = await self._sub.consumer_info()
        except BaseException:
            await self.stop()
            raise
        self._heard = asyncio.get_running_loop().time()
        if self._catchup.sized(info.delivered.consumer_seq + info.num_pending):
            await self._queue.put(None)
        self._sized.set()

    async def _on_message(self, msg: Any) -> None:
        await self._sized.wait()  # messages may come before the server's count is in
        self._heard = asyncio.get_running_loop().time()
        meta = msg.metadata
        op = operation(msg.headers)
        if op != "?" and not (self._ignore_deletes and op in (KV_DEL, KV_PURGE)):
            entry = Entry(
                bucket=self._kv._name,
                key=msg.subject[len(self._kv._pre) :],
                value=msg.data,
                revision=meta.sequence.stream,
                delta=meta.num_pending,
                created=meta.timestamp,
                operation=op,
            )
            await self._queue.put(entry)
        if self._catchup.message(meta.num_pending):
            await self._queue.put(None)

    async def updates(self, timeout: float | None = None) -> Entry | None:
        """The next entry, or ``None`` once, where the snapshot ends."""
        if self._stopped:
            raise nats.errors.TimeoutError  # nothing more will come
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while True:
            wait = None if end is None else end - loop.time()
            if not self._catchup.done and self._catchup.drained:
                settle = self._heard + SETTLE_S - loop.time()
                wait = settle if wait is None else min(wait, settle)
            if not self._queue.empty():
                await asyncio.sleep(0)  # one turn of the loop per entry: a backlog never starves other tasks
                return self._queue.get_nowait()
            try:
                async with asyncio.timeout(max(wait, 0.0) if wait is not None else None):
                    return await self._queue.get()
            except TimeoutError:
                if self._queue.empty() and loop.time() >= self._heard + SETTLE_S and self._catchup.settled():
                    return None
                if end is not None and loop.time() >= end:
                    raise nats.errors.TimeoutError from None

    def __aiter__(self) -> KvWatch:
        return self

    async def __anext__(self) -> Entry | None:
        if self._stopped:
            raise StopAsyncIteration
        return await self.updates()

    async def stop(self) -> None:
        """Unsubscribe; a connection already closing is no error here."""
        if self._stopped:
            return
        self._stopped = True
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()


async def watch(
    kv: KeyValue, keys: str = ">", *, ignore_deletes: bool = False, inactive_s: float = LIVE_INACTIVE_S
) -> KvWatch:
    """Open a watch of ``keys`` in ``kv`` (see `KvWatch`); the caller stops it."""
    watcher = KvWatch(kv, keys, ignore_deletes=ignore_deletes, inactive_s=inactive_s)
    await watcher.start()
    return watcher


@contextlib.asynccontextmanager
async def watching(
    kv: KeyValue, keys: str = ">", *, ignore_deletes: bool = False, inactive_s: float = LIVE_INACTIVE_S
) -> AsyncIterator[KvWatch]:
    """`watch` as a context manager: stopped on the way out, however the block ends."""
    watcher = await watch(kv, keys, ignore_deletes=ignore_deletes, inactive_s=inactive_s)
    try:
        yield watcher
    finally:
        await watcher.stop()


async def snapshot(kv: KeyValue, keys: str = ">", *, timeout: float | None = None) -> list[Entry]:
    """The current value of every key matching ``keys`` (deleted keys left out), in stream order:
    every key that had a value when it began and still has one (`latest_per_subject`, which
    ``timeout`` is passed to)."""
    return [
        Entry(
            bucket=kv._name,
            key=m.subject[len(kv._pre) :],
            value=m.data,
            revision=m.seq,
            delta=0,
            created=m.time,  # type: ignore[arg-type]  # a datetime, as nats-py's own watcher gives
            operation=None,
        )
        for m in await latest_per_subject(kv._js, kv._stream, f"{kv._pre}{keys}", timeout=timeout)
        if operation(m.headers) is None
    ]


@dataclass(frozen=True)
class Latest:
    """The latest message of one subject of a stream."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    seq: int
    time: object  # the message's datetime, when the server stored it


async def latest_per_subject(
    js: JetStreamContext, stream: str, subject: str, *, timeout: float | None
) -> list[Latest]:
    """The latest message of every subject under ``subject`` in ``stream`` that had one when this
    began, and of any that came since and were read on the way, in stream order; delete and purge
    markers included (the caller tells them apart).

    The subjects come from the stream's own list (`_subjects`); an ordered consumer delivering the
    last message of each (``LAST_PER_SUBJECT``) reads them. Neither its count nor its per-message
    ``num_pending`` proves the read complete: in a bucket keeping one revision a key written while
    it is read loses the message the consumer was about to send, and both counts can drop or reach
    0 and rise again (a listing beside a busy writer missed keys). The read stops when every listed
    subject has come, the server's count (`Catchup`) is met, or no message came for ``timeout``
    seconds (`SNAPSHOT_WAIT_S` when None: a one-off read never waits unbounded); a subject still
    missing then is fetched alone (or found gone). The server's errors (a timeout of its own)
    are raised."""
    wanted = await _subjects(js, stream, subject)
    if not wanted:
        return []
    got: dict[str, Latest] = {}
    sub = await js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
        inactive_threshold=SNAPSHOT_INACTIVE_S,
    )
    catchup = Catchup()
    each = SNAPSHOT_WAIT_S if timeout is None else timeout
    try:
        info = await sub.consumer_info()
        sent = info.delivered.consumer_seq if info.delivered is not None else 0
        done = catchup.sized((sent or 0) + (info.num_pending or 0))
        while not done and not wanted <= got.keys():
            try:
                msg = await sub.next_msg(timeout=min(each, SETTLE_S) if catchup.drained else each)
            except nats.errors.TimeoutError:
                break  # the rest were removed before they were sent, or come slowly: fetched alone
            meta = msg.metadata
            got[msg.subject] = Latest(
                msg.subject, msg.data, msg.headers, meta.sequence.stream, meta.timestamp
            )
            done = catchup.message(meta.num_pending)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    missing = sorted(wanted - got.keys())
    for start in range(0, len(missing), FETCH_AT_ONCE):
        part = missing[start : start + FETCH_AT_ONCE]
        for one in await asyncio.gather(*(_last(js, stream, s) for s in part)):
            if one is not None:
                got[one.subject] = one
    return sorted(got.values(), key=lambda m: m.seq)


async def _subjects(js: JetStreamContext, stream: str, subject: str) -> set[str]:
    """Every subject under ``subject`` with a message in ``stream``. The server lists at most
    100,000 in one answer, with ``total`` and an ``offset`` to page on; nats-py's ``stream_info``
    reads the first page only, so the pages are asked for here (its request helper and subject
    prefix are read here and nowhere else)."""
    out: set[str] = set()
    while True:
        ask = {"subjects_filter": subject, "offset": len(out)}
        answer = await js._api_request(
            f"{js._prefix}.STREAM.INFO.{stream}", json.dumps(ask).encode(), timeout=js._timeout
        )
        page = (answer.get("state") or {}).get("subjects") or {}
        out.update(page)
        if not page or len(out) >= int(answer.get("total") or 0):
            return out


async def _last(js: JetStreamContext, stream: str, subject: str) -> Latest | None:
    """The last message of one subject, None once it has none."""
    try:
        raw = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return None
    return Latest(subject, raw.data or b"", raw.headers, raw.seq or 0, raw.time)


async def watch_until(watch: Callable[[], Coroutine[Any, Any, None]], restart: asyncio.Event) -> None:
    """Run one ``watch()`` until it ends or ``restart`` is set (cleared first); a watch that fails
    raises here, for the loop's supervisor. A watch on a bucket that a restarted NATS created again
    hears nothing more: its owner sets ``restart`` once the buckets are open again (`Reopener`)."""
    restart.clear()
    run = asyncio.create_task(watch(), name="watch")
    again = asyncio.create_task(restart.wait(), name="watch-restart")
    try:
        await asyncio.wait((run, again), return_when=asyncio.FIRST_COMPLETED)
        failure = run.exception() if run.done() and not run.cancelled() else None
    finally:
        await cancel_and_wait([run, again])
    if failure is not None:
        raise failure


async def watch_forever(watch: Callable[[], Coroutine[Any, Any, None]], restart: asyncio.Event) -> None:
    """`watch_until` again and again: a new watch whenever one ends (a silent or replaced bucket) or
    ``restart`` is set. A watch that fails raises, for the loop's supervisor; `watch_until` alone
    returns on a restart, and a supervisor takes a return for the end of the loop."""
    while True:
        await watch_until(watch, restart)
