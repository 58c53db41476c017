"""Waiting in the fleet-wide queue (`corral.runtime.workqueue`) for the next free slot of a model.

A queued request is published to the JetStream queue with its reply subject in its headers; the
agent that takes it claims it on that subject like any other. While it waits, the gateway checks
every ``queue_recheck_s`` that some agent still has or is loading the model, and withdraws it (to
plan again) when none does; at its deadline it is withdrawn and answered Ollama's 503.

The queue needs JetStream, which a cluster loses for seconds at a time when a node dies (its leaders
are elected again), while the claims agents hold on core NATS go on working. So every recheck
JetStream is asked whether the queue's reader answers, once per queue subject however many requests
wait there (`_Rechecks`); a request nobody took while it does not is withdrawn and planned again
(`corral.gateway.queuewait`), which routes it by claims.

A batch-priority request waits in the queue's batch lane, which agents serve only when no
interactive request of that model waits; after ``batch_aging_s`` there it is withdrawn and queued
again at the end of the interactive lane, so interactive work can hold it back that long at most.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping

import nats.errors
from corral.gateway.metrics import Decision
from corral.gateway.outage import Outage
from corral.gateway.placement import Loads
from corral.gateway.queuewait import QueueWait, Silence
from corral.gateway.settings import GatewaySettings
from corral.gateway.shutdown import MESSAGE as STOP_MESSAGE
from corral.gateway.shutdown import Shutdown
from corral.protocol.errors import NoCapacity
from corral.protocol.messages import AgentState
from corral.protocol.names import ANY_VENDOR
from corral.protocol.priority import BATCH, INTERACTIVE, Priority
from corral.routing import Route, warm
from corral.runtime.fleet import FleetView
from corral.runtime.telemetry import publish_span
from corral.runtime.workqueue import (
    Queued,
    QueueFull,
    Reader,
    enqueue,
    reader_position,
    still_queued,
    withdraw,
)
from corral.transport import Failure, Reply, Transport, WorkRequest

log = logging.getLogger(__name__)


class FleetQueue:
    """This gateway's requests in the fleet queue: the waits themselves and their count per model."""

    def __init__(
        self,
        transport: Transport,
        fleet: FleetView,
        loads: Loads,
        settings: GatewaySettings,
        shutdown: Shutdown | None = None,
        outage: Outage | None = None,
    ) -> None:
        self._shutdown = shutdown or Shutdown()  # once the gateway drains, no request waits here
        self._outage = outage or Outage(settings.nats_outage_s)  # a long one ends the waits
        self._transport = transport
        self._js = transport.nc.jetstream()
        self._fleet = fleet
        self._loads = loads
        self._settings = settings
        # (model key, lane) → this gateway's requests waiting in the fleet queue
        self._waiting: dict[tuple[str, Priority], int] = {}
        self._rechecks = _Rechecks(transport, settings.queue_recheck_s)

    def stop(self) -> None:
        """Drop the JetStream questions still out (the gateway stops)."""
        self._rechecks.stop()

    def with_queue(
        self,
        route: Route,
        usable: list[AgentState],
        priority: Priority = INTERACTIVE,
        outstanding: Mapping[str, int] | None = None,
    ) -> Mapping[str, int]:
        """Outstanding sends (``outstanding``, the transport's by default) plus this gateway's
        requests waiting in the fleet queue for ``route``'s model ahead of a ``priority`` request,
        shared out over the agents that serve it: a long queue makes a load elsewhere win. Batch
        work waiting does not count for an interactive request: it goes first anyway."""
        outstanding = self._transport.outstanding if outstanding is None else outstanding
        waiting = self._waiting.get((route.key, INTERACTIVE), 0)
        if priority == BATCH:
            waiting += self._waiting.get((route.key, BATCH), 0)
        if not waiting:
            return outstanding
        serving = [a.id for a in usable if warm(route, a)]
        if not serving:
            return outstanding
        share = -(-waiting // len(serving))
        out = dict(outstanding)
        for agent_id in serving:
            out[agent_id] = out.get(agent_id, 0) + share
        return out

    def _count(self, key: str, lane: Priority, n: int) -> None:
        waiting = self._waiting.get((key, lane), 0) + n
        if waiting:
            self._waiting[key, lane] = waiting
        else:
            self._waiting.pop((key, lane), None)

    async def _enqueue(
        self, req: WorkRequest, vendor: str, payload: bytes, hdrs: dict[str, str], lane: Priority
    ) -> Queued | None:
        """``req`` queued at the end of ``lane``; `NoCapacity` when the queue is full, None when
        NATS failed (logged: the caller plans again)."""
        assert req.model is not None
        t = self._transport
        try:
            return await enqueue(t.nc, self._js, t.subjects, vendor, req.model.token, payload, hdrs, lane)
        except QueueFull:
            raise NoCapacity() from None
        except nats.errors.Error as e:
            log.warning("cannot queue a request for %s in the %s lane: %s", req.model.key, lane, e)
            return None

    def someone_serves(self, route: Route, failed: set[str]) -> bool:
        """Some usable agent has, or is loading, a runner for ``route`` (of its vendor, when the
        request insists on one: another vendor's runner never takes it from the queue)."""
        for a in self._fleet.with_model(route.key):
            if (
                a.status == "active"
                and a.id not in failed
                and route.admits(a.vendor)
                and (warm(route, a) or self._loads.loading_at(route, a))
            ):
                return True
        return False

    async def wait(
        self,
        req: WorkRequest,
        route: Route,
        deadline: float,
        failed: set[str],
        decision: Decision | None = None,
        on_failure: Callable[[Failure], None] | None = None,
    ) -> Reply | None:
        """Wait in the fleet-wide queue for the next free slot; None to re-plan (nobody will serve it).
        What to do each time no claim came is `QueueWait`'s to say; this does the I/O. ``decision``
        is told, once an agent claimed it, how long it waited (`Decision.queue_s`: until the claim,
        not the head, which an unstreamed reply sends only at its end); ``on_failure``, when the
        agent that took it failed it before its head (the request is then routed again)."""
        assert req.model is not None
        transport = self._transport
        vendor = req.vendor if (req.vendor and req.strict) else ANY_VENDOR
        call, hdrs, payload = transport.register(req, None, deadline, queued=True)
        token = req.model.token
        keep = False
        queued: Queued | None = None
        # whether it is still in the stream, asked at one silence and read at a later one: the wait
        # for its claim never waits on JetStream (slow while a cluster elects a leader)
        check: asyncio.Task[bool | None] | None = None
        check_at = 0.0  # when it was asked
        lane = req.priority
        stop_tried = False
        began = time.monotonic()
        self._count(route.key, lane, +1)
        try:
            if self._shutdown.closing.done():  # the gateway's grace is over: nothing joins the queue now
                raise NoCapacity(STOP_MESSAGE)
            # its own PRODUCER span, whose context rides in the queued headers: the agent that
            # takes it carries on the request's trace
            subject = transport.subjects.queue(vendor, token, lane)
            with publish_span(transport.subjects.queue_template, subject, hdrs, tracer=transport.tracer):
                queued = await self._enqueue(req, vendor, payload, hdrs, lane)
            if queued is None:
                return None
            aging_s = self._settings.batch_aging_s if lane == BATCH else None
            queued_at = time.monotonic()
            state = QueueWait(
                queued_at,
                deadline,
                recheck_s=self._settings.queue_recheck_s,
                claim_timeout_s=transport.claim_timeout,
                aging_s=aging_s,
            )
            while True:
                try:
                    msg = await call.next(state.timeout(time.monotonic()))
                except TimeoutError:
                    if self._shutdown.closing.done() and not stop_tried:
                        # it joined as the grace ran out, after the relay looked (`_until_gone`)
                        stop_tried = True  # once: a withdraw that fails means an agent has it
                        if await withdraw(self._js, queued):
                            raise NoCapacity(STOP_MESSAGE) from None
                    now = time.monotonic()
                    connected = transport.nc.is_connected
                    if (cut_off := self._outage.seen(connected, now, transport.epoch())) is not None:
                        self._rechecks.withdraw(queued)  # an agent that takes it first claims a call released
                        raise NoCapacity(cut_off) from None
                    subject = transport.subjects.queue(vendor, token, lane)
                    left = passed = False
                    if check is not None and check.done():
                        there = _answered(check)
                        left = there is False
                        # the reader, asked since it was queued and before the stream was asked: past
                        # it, yet still there
                        passed = there is True and self._rechecks.passed(
                            subject, queued.seq, queued_at, check_at
                        )
                        check = None  # read: the next asks again
                    now = time.monotonic()
                    unreadable = self._rechecks.unreadable(subject, now)
                    step = state.silence(now, left_stream=left, unreadable=unreadable, passed=passed)
                    if step is Silence.PROMOTE:
                        # to the end of the interactive lane, unless an agent took it just now
                        if await withdraw(self._js, queued):
                            self._count(route.key, lane, -1)
                            lane = INTERACTIVE
                            self._count(route.key, lane, +1)
                            moved = await self._enqueue(req, vendor, payload, hdrs, lane)
                            if moved is None:
                                return None
                            queued, queued_at = moved, time.monotonic()
                            state.requeued()
                            if check is not None:
                                check.cancel()  # it asked about the entry withdrawn
                                check = None
                        continue
                    if step is Silence.EXPIRE:
                        if await withdraw(self._js, queued):
                            raise NoCapacity() from None
                        try:  # an agent took it just now: its claim is on the way
                            msg = await call.next(transport.claim_timeout)
                        except TimeoutError:
                            raise NoCapacity() from None
                    elif step is Silence.ABANDONED:
                        log.warning("a queued %s was taken but never claimed: routing it again", req.endpoint)
                        return None
                    elif step is Silence.PASSED:
                        log.warning(
                            "the queue's reader passed a queued %s, which no agent will get now: routing it again",
                            req.endpoint,
                        )
                        self._rechecks.withdraw(queued)
                        return None
                    elif step is Silence.UNREADABLE:
                        # withdrawn in the background (JetStream may take its whole timeout to fail):
                        # an agent that takes it meanwhile claims a call released, which cancels it
                        log.warning("no agent can take a queued %s now: routing it again", req.endpoint)
                        self._rechecks.withdraw(queued)
                        return None
                    else:
                        if check is None:
                            check, check_at = asyncio.create_task(still_queued(self._js, queued)), now
                        if step is Silence.TAKEN or self.someone_serves(route, failed):
                            continue
                        if not await withdraw(self._js, queued):
                            continue  # an agent took it just now
                        return None  # withdrawn: nobody has or is loading the model any more
                if decision is not None:  # claimed: an agent has it
                    decision.queue_s = (decision.queue_s or 0.0) + time.monotonic() - began
                outcome = await transport.handshake(call, msg, "the queue")
                if isinstance(outcome, Reply):
                    keep = True
                    return outcome
                if isinstance(outcome, Failure):  # routed again, never to that agent
                    failed.add(outcome.agent)
                    if on_failure is not None:
                        on_failure(outcome)
                return None
        except asyncio.CancelledError:
            if queued is not None:
                # in the background: its client (or the gateway's stop) is answered now, not after
                # JetStream's answer; an agent that takes it meanwhile claims a call released,
                # which cancels it
                self._rechecks.withdraw(queued)
            await asyncio.shield(transport.cancel(call))
            raise
        finally:
            if check is not None:
                check.cancel()  # a JetStream request: a cancelled one is dropped when its answer comes
            self._count(route.key, lane, -1)
            if not keep:
                transport.release(call)


class _Rechecks:
    """Per queue subject, once for all of this gateway's requests waiting there: JetStream asked
    whether the subject's reader answers; and the withdrawals of requests the queue could not
    serve, which nobody waits for."""

    def __init__(self, transport: Transport, every_s: float) -> None:
        self._transport = transport
        self._js = transport.nc.jetstream()
        self._every_s = every_s
        self._asking: dict[str, asyncio.Task[Reader | None]] = {}  # subject → its last question
        self._asked_at: dict[str, float] = {}  # subject → when the last question was asked
        self._answers: dict[str, tuple[float, Reader | None]] = {}  # subject → (asked when, answer)
        self._withdrawing: set[asyncio.Task[bool]] = set()

    def unreadable(self, subject: str, now: float) -> bool:
        """Whether JetStream's latest answer for ``subject``'s reader was none, if it is recent:
        asked within a question's timeout and two rechecks (a request withdrawn and queued again
        meanwhile still reads it; so does every request waiting there while the next question is
        out). Asks again when none is out and the last was asked a recheck ago."""
        asking = self._asking.get(subject)
        due = now - self._asked_at.get(subject, -math.inf) >= self._every_s
        if due and (asking is None or asking.done()):
            t = self._transport
            task = asyncio.create_task(
                reader_position(self._js, t.subjects, subject, timeout=t.claim_timeout)
            )
            task.add_done_callback(functools.partial(self._answered, subject, now))
            self._asking[subject] = task
            self._asked_at[subject] = now
        answer = self._answers.get(subject)
        if answer is None:
            return False
        at, position = answer
        return position is None and now - at <= 2 * self._every_s + self._transport.claim_timeout

    def passed(self, subject: str, seq: int, after: float, before: float) -> bool:
        """Whether the latest answer for ``subject``'s reader, asked between ``after`` and
        ``before``, says it had passed stream sequence ``seq`` (`Reader.passed`)."""
        answer = self._answers.get(subject)
        if answer is None:
            return False
        at, reader = answer
        return reader is not None and reader.passed(seq) and after <= at <= before

    def _answered(self, subject: str, at: float, task: asyncio.Task[Reader | None]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._answers[subject] = (at, task.result())

    def withdraw(self, queued: Queued) -> None:
        """Withdraw ``queued`` without waiting for JetStream to answer."""
        task = asyncio.create_task(withdraw(self._js, queued))
        self._withdrawing.add(task)
        task.add_done_callback(self._withdrawing.discard)

    def stop(self) -> None:
        for task in self._asking.values():
            task.cancel()
        self._asking.clear()
        for withdrawal in self._withdrawing:
            withdrawal.cancel()


def _answered(check: asyncio.Task[bool | None]) -> bool | None:
    """A finished `still_queued` task's answer; None when it was cancelled or failed (logged)."""
    if check.cancelled():
        return None
    if (e := check.exception()) is not None:
        log.warning("cannot tell whether a queued request was taken: %r", e)
        return None
    return check.result()
