"""Every gateway's share of the fleet's batch work: lines from the one durable pull consumer that all
gateways share, run through this gateway's own HTTP path at batch priority (`call`).

The consumer acks explicitly, holds at most `BatchLimits.in_flight` lines unacked fleet-wide
(``max_ack_pending``), and redelivers a line silent for ``ack_wait_s``: a line that runs sends
``in_progress`` every third of that, so only a line whose gateway died (or was cut off in the
middle of a generation) runs again, elsewhere. A line is acked only once its result is stored (the
first stored result of a line is its result, `BatchStore.store_result`), then its batch is
finalized if that was its last line (`Lifecycle.maybe_finalize`).

Answers: a 2xx or a 4xx from the model is the line's result (a 4xx goes to the error file with its
status and body, as OpenAI's does); a 5xx or 429 (server busy, agent gone, timeouts) is retried by a
``nak`` with a doubling delay, up to `BatchLimits.attempts` runs, then it is an error line. A line of
a cancelling batch is answered ``batch_cancelled`` without running, of an expired one
``batch_expired``: in-flight lines finish and the rest come back at once, so the batch ends exactly
when its last in-flight line did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from corral.gateway.access import ApiKey
from corral.gateway.asgi import App
from corral.gateway.auth import Access
from corral.gateway.batch.call import call
from corral.gateway.batch.lifecycle import BatchLimits, Lifecycle
from corral.gateway.batch.lines import (
    CANCELLED,
    EXPIRED,
    Line,
    LineResult,
    answered,
    line_decoder,
    unanswered,
)
from corral.gateway.batch.model import TERMINAL, BatchRecord
from corral.gateway.batch.store import BatchStore, Missing
from corral.protocol.subjects import Subjects
from corral.runtime.tasks import cancel_and_wait, supervise
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import Error as JetStreamError

log = logging.getLogger(__name__)

FETCH_WAIT_S = 5.0  # a pull waits this long for lines before it asks again
RETRIED = frozenset({408, 429})  # 4xx answers that say "later", not "never"


def retry_delay(runs: int, limits: BatchLimits) -> float:
    """The wait before run ``runs + 1`` of a line that failed transiently."""
    return float(min(limits.retry_max_s, limits.retry_first_s * 2 ** max(0, runs - 1)))


def transient(status: int) -> bool:
    return status >= 500 or status in RETRIED or status == 0


class BatchRunner:
    """Started and stopped with its gateway (`corral.gateway.app.Gateway`); `stop` hands the lines
    it was running back to the consumer at once, for another gateway."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        app: App,
        *,
        access: Access | None,
        limits: BatchLimits,
        replicas: int = 1,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._app = app
        self._access = access
        self.limits = limits
        self._replicas = replicas
        self._lifecycle: Lifecycle | None = None
        self._opened = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()

    @property
    def lifecycle(self) -> Lifecycle:
        assert self._lifecycle is not None, "the batch stores are not open"
        return self._lifecycle

    async def open(self, *, create: bool) -> Lifecycle | None:
        """The stores, opened (made, with ``create``, on a fleet's first upload); None while they do
        not exist. Lines start running here once they are open."""
        if self._lifecycle is None:
            try:
                store = await BatchStore.open(
                    self._nc.jetstream(),
                    self._subjects,
                    max_payload=self._nc.max_payload,
                    replicas=self._replicas,
                    create=create,
                )
            except Missing:
                return None
            if self._lifecycle is None:
                self._lifecycle = Lifecycle(store, self.limits)
                self._opened.set()
        return self._lifecycle

    async def start(self) -> None:
        await self.open(create=False)
        self._tasks = [
            asyncio.create_task(supervise("batch lines", self._pull), name="batch-lines"),
            asyncio.create_task(supervise("batch sweep", self._sweep), name="batch-sweep"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        await cancel_and_wait(self._running)  # each hands its line back (`_run`)
        self._running.clear()

    # -- the consumer ------------------------------------------------------------------------------
    async def _pull(self) -> None:
        await self._opened.wait()
        js = self._nc.jetstream()
        s = self._subjects
        cfg = ConsumerConfig(
            durable_name=s.batch_consumer,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.limits.ack_wait_s,
            max_ack_pending=self.limits.in_flight,
            max_deliver=-1,  # the runner bounds the runs of a line itself, then stores an error
            filter_subject=s.batch_lines_all,
        )
        sub = await js.pull_subscribe(
            s.batch_lines_all, durable=s.batch_consumer, stream=s.batch_lines_stream, config=cfg
        )
        try:
            while True:
                free = self.limits.slots - len(self._running)
                if free <= 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                try:
                    msgs = await sub.fetch(free, timeout=FETCH_WAIT_S)
                except (TimeoutError, NatsTimeoutError):
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self._run(msg), name="batch-line")
                    self._running.add(task)
                    task.add_done_callback(self._ended)
        finally:
            with contextlib.suppress(NatsError, JetStreamError):  # closing under us
                await sub.unsubscribe()

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slot_freed.set()

    async def _sweep(self) -> None:
        """Every ``sweep_s``: open the stores if another gateway made them since, and look over the
        unfinished batches (`Lifecycle.sweep`)."""
        while True:
            lifecycle = await self.open(create=False)
            if lifecycle is not None:
                await lifecycle.sweep()
            await asyncio.sleep(self.limits.sweep_s)  # a period, not a wait for readiness

    # -- one line ----------------------------------------------------------------------------------
    async def _run(self, msg: Msg) -> None:
        try:
            line = line_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.error("dropping an undecodable batch line on %s", msg.subject)
            await msg.term()
            return
        try:
            await self._line(msg, line)
        except asyncio.CancelledError:
            with contextlib.suppress(NatsError, JetStreamError):  # another gateway runs it now
                await asyncio.shield(msg.nak())
            raise
        except Exception:  # a per-message handler: log it, run the line again later
            log.exception("batch %s line %d failed here; it runs again later", line.batch, line.index)
            with contextlib.suppress(NatsError, JetStreamError):
                await msg.nak(delay=retry_delay(msg.metadata.num_delivered, self.limits))

    async def _line(self, msg: Msg, line: Line) -> None:
        store = self.lifecycle.store
        stored = await store.batch(line.batch)
        if stored is None or stored.record.batch.status in TERMINAL | {"finalizing"}:
            await msg.ack()  # its batch is gone or has its files already
            return
        rec = stored.record
        result: LineResult | None
        if rec.batch.status == "cancelling":
            result = unanswered(
                line.custom_id, CANCELLED, "This request was not run: the batch was cancelled."
            )
        elif rec.ending == "expire":
            result = unanswered(line.custom_id, EXPIRED, "This request was not run before the batch expired.")
        else:
            result = await self._answer(msg, line, rec)
            if result is None:
                return  # handed back for a later run
        await store.store_result(line.batch, line.index, result)
        await msg.ack_sync()  # gone from the stream before `maybe_finalize` counts what is left
        await self.lifecycle.maybe_finalize(line.batch)

    async def _answer(self, msg: Msg, line: Line, rec: BatchRecord) -> LineResult | None:
        key = None
        if rec.owner and self._access is not None:
            key = self._key(rec.owner)
            if key is None:
                return unanswered(
                    line.custom_id, "invalid_api_key", "The API key that made this batch was revoked."
                )
        beat = asyncio.create_task(self._heartbeat(msg), name="batch-line-heartbeat")
        try:
            body = await self.lifecycle.store.line_body(line)
            answer = await call(self._app, line.url, body, key=key, access=self._access)
        finally:
            await cancel_and_wait([beat])
        if transient(answer.status):
            runs = msg.metadata.num_delivered
            if runs < self.limits.attempts:
                await msg.nak(delay=retry_delay(runs, self.limits))
                return None
            text = answer.body[:500].decode("utf-8", "replace")
            message = f"No answer after {runs} attempts; the last was HTTP {answer.status}: {text}"
            return unanswered(line.custom_id, "server_error", message)
        # the gateway sets no request id of its own: the line's place in its batch is one
        return answered(line.custom_id, answer.status, answer.body, f"{line.batch}-{line.index}")

    async def _heartbeat(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.limits.ack_wait_s / 3)  # a period: the consumer's ack wait
            await msg.in_progress()

    def _key(self, name: str) -> ApiKey | None:
        """The record of the key that made a batch, as this gateway knows it now (None once revoked)."""
        assert self._access is not None
        return self._access.keys.by_name(name)
