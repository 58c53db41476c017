"""A request over NATS and the start of its reply stream: `Transport`.

One `Transport` per sender (a gateway, the registry, the direct client, the CLI) holds one wildcard
subscription for the replies to all its calls (``reply.{sender}.*``) and one for its large bodies
(``body.{sender}.*``, `corral.transport.bodies`: whole bodies, and streamed ones — blob uploads
still arriving from the client — served as the agent asks), and hands each reply message to its
call by request id. It registers calls, publishes work messages (headers from `corral.protocol.envelope.RequestEnvelope`), reads a reply's
claim, pings and head, tells agents to cancel, and counts the calls each agent holds for this sender
(`outstanding`: agents publish their own counts only now and then). It makes no routing decisions:
the caller names the subject.

An attempt that fails before the agent sent its ``head`` (no claim in time, the agent went silent,
the agent could not reach its Ollama) is an `Outcome`; after the head, failures end the stream with
an error (`Reply.batches` raises).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Mapping

import msgspec
import nats.errors
from corral.protocol import headers as H
from corral.protocol.envelope import RequestEnvelope, fits
from corral.protocol.errors import AgentUnavailable, BadRequest, NoCapacity, end_error, from_code
from corral.protocol.subjects import Subjects
from corral.runtime.nats import published, stream_delivery
from corral.runtime.telemetry import attempted, publish_span
from corral.transport.bodies import LargeBodies
from corral.transport.reply import CONNECTION_LOST, Call, Failure, Outcome, Reply
from corral.transport.request import WorkRequest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

# reply messages that say an agent holds the request (each names it): its claim, a head, its pings
_HELD = frozenset({H.CLAIM, H.HEAD, H.PING})

# an agent sends at most this many bytes of a reply ahead of what its requester has taken (a
# ``Corral-Window``): a large answer, or a client that reads slowly, waits at the agent (and in its
# Ollama's socket) instead of piling up in NATS, whose server drops a connection that falls 64 MB behind
REPLY_WINDOW = 8 * 1024 * 1024
WARM_BUSY_RETRIES = 3  # a shared subject answered busy: NATS may pick another listener next time


class Transport:
    # Sixteen attributes: the connection, subjects, this sender's id, reply-subject prefix and
    # subscriptions, the tracer and fleet membership it was given; its three timeouts and the
    # reply bound, which its callers read too; and its own state: the calls and their id counter,
    # the counts per agent, the agents that left a request unanswered, and the large bodies held.
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        *,
        claim_timeout: float = 2.0,
        warm_claim_timeout: float | None = None,
        idle_timeout: float = 10.0,
        reply_buffer: int = 0,
        tracer: Tracer | None = None,
        members: Callable[[str], bool] | None = None,
        sender_id: str = "",
    ) -> None:
        """``members``: whether an agent id belongs to the fleet (the sender's fleet view); a claim
        from any other is not believed. None believes every claimant (a sender without a view).
        ``sender_id``: this sender's token in its reply and body subjects; empty = random (a fixed
        one lets NATS permissions give each sender only its own replies)."""
        self.nc = nc
        self.subjects = subjects
        self.claim_timeout = claim_timeout  # an agent must claim within this
        # on a subject every free slot shares (a warm claim) a claim comes at once or not at all: a
        # NATS cluster may drop one unseen where a single server answers "no responders"
        self.warm_claim_timeout = claim_timeout if warm_claim_timeout is None else warm_claim_timeout
        self.idle_timeout = idle_timeout  # a claimed request silent this long means a dead agent
        self.reply_buffer = reply_buffer  # bytes of reply one call may hold unread; 0 = no bound
        self._tracer = tracer
        self._members = members
        self.id = sender_id or secrets.token_hex(6)
        self._ids = itertools.count(1)
        self._calls: dict[str, Call] = {}
        self._outstanding: dict[str, int] = {}  # agent id → calls it holds for this sender
        # agent id → when it last let a request sent to it go unanswered (no claim, or silence
        # before its head): a stopped or cut-off agent; a sender with a fleet view skips it until
        # its state is heard again (`corral.gateway.planner`)
        self.unanswered: dict[str, float] = {}
        self._subs: list[Subscription] = []
        self._reply_prefix = len(subjects.reply(self.id, "x")) - 1
        self._reconnects = self.epoch()  # the connection's reconnects as of the last reply message
        self._bodies = LargeBodies(nc, len(subjects.body(self.id, "x")) - 1)

    @property
    def reply_window(self) -> int:
        """Bytes an agent may send of a reply ahead of what was taken of it: `REPLY_WINDOW`, at most
        half the reply bound, so that a reply's queue never overflows it."""
        return max(min(REPLY_WINDOW, self.reply_buffer // 2), 1) if self.reply_buffer else REPLY_WINDOW

    async def took(self, call: Call, taken: int) -> None:
        """Tell the agent replying to ``call`` that ``taken`` bytes of its body were taken."""
        if call.agent:
            try:
                await self.nc.publish(
                    self.subjects.agent_ctl(call.agent),
                    b"",
                    headers={H.CTL: H.READ_CTL, H.REQUEST: call.rid, H.READ: str(taken)},
                )
            except nats.errors.Error as e:  # the connection is closing: the reply ends with it
                log.debug("cannot tell %s what was read of %s: %s", call.agent, call.rid, e)

    @property
    def tracer(self) -> Tracer | None:
        """The tracer of this sender's spans (None: the global one)."""
        return self._tracer

    async def start(self) -> None:
        self._subs.append(
            await self.nc.subscribe(
                self.subjects.reply_all(self.id),
                cb=self._on_reply,
                pending_bytes_limit=512 * 1024 * 1024,
            )
        )
        self._subs.append(
            await self.nc.subscribe(self.subjects.body_all(self.id), cb=published(self._bodies.serve))
        )

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):  # the connection is closing already
                await sub.unsubscribe()
        self._subs.clear()
        await self._bodies.close()

    @property
    def in_flight(self) -> int:
        """Calls registered and not yet released."""
        return len(self._calls)

    @property
    def bodies_held(self) -> int:
        """Bytes of large request bodies this sender holds now (streamed ones: what is buffered)."""
        return self._bodies.held

    @property
    def bodies_streaming(self) -> int:
        """Streamed request bodies being served now."""
        return self._bodies.streams

    @property
    def outstanding(self) -> Mapping[str, int]:
        """Agent id → calls it holds for this sender (only agents with at least one)."""
        return self._outstanding

    # -- the reply mux ---------------------------------------------------------------------------
    async def _on_reply(self, msg: Msg) -> None:
        if stream_delivery(msg):  # `corral.runtime.nats.published`, inline: every chunk passes here
            return
        if (reconnects := self.nc.stats["reconnects"]) != self._reconnects:  # the first since it came back
            self._reconnects = reconnects
            self._cut_replies()
        call = self._calls.get(msg.subject[self._reply_prefix :])
        if call is not None:
            overflowed = call.overflowed
            if not call.put(msg) and not overflowed and call.agent:
                # its reader fell too far behind: stop the work now, not when the reader notices
                log.warning("reply to %s overflowed %d bytes; cancelling it", call.rid, self.reply_buffer)
                await self._send_cancel(call.agent, call.rid)
        elif msg.headers and msg.headers.get(H.KIND) in _HELD and H.AGENT in msg.headers:
            # a claim (claiming head, ping) for a request we gave up on, or never held (a gateway
            # restarted under the same id; a cancel lost to a NATS outage): tell that agent to drop it
            agent = msg.headers.get(H.AGENT)
            if agent:
                await self._send_cancel(agent, msg.subject[self._reply_prefix :])

    def _cut_replies(self) -> None:
        """The connection came back: what agents sent to open replies while it was away is lost
        (core NATS keeps nothing for a subscriber that is not there), so each ends where its hole
        begins — everything that came before the outage first — rather than going on with text
        missing from its middle, and its agent is told to stop."""
        lost = {H.KIND: CONNECTION_LOST}
        for call in self._calls.values():
            if call.replying:
                call.put(Msg(_client=self.nc, subject=self.reply_subject(call), headers=dict(lost)))

    # -- calls -----------------------------------------------------------------------------------
    def register(
        self, req: WorkRequest, agent: str | None, deadline: float, *, queued: bool = False, now: bool = False
    ) -> tuple[Call, dict[str, str], bytes]:
        """Register a call for one attempt at ``req``: (call, headers, payload) to publish. The call
        counts against ``agent`` (when named) until `release`. ``queued``: the message goes into the
        fleet queue, so it names its reply subject in a header (JetStream keeps headers, not the
        reply-to). ``now``: the agent starts it on a free slot or answers busy (``Corral-Now``). The
        message stays under the server's max_payload, every header counted: a body that does not fit
        beside its headers is served in chunks instead, and headers that cannot fit even alone are a
        `BadRequest` (nothing registered)."""
        # unique (the counter) and unguessable (64 random bits): nobody who did not see the request
        # can aim a message at its reply subject, and no two senders' ids meet at an agent
        rid = format(next(self._ids), "x") + secrets.token_hex(8)
        envelope = RequestEnvelope(
            rid=rid,
            endpoint=req.endpoint,
            deadline_ms=int((time.time() + max(deadline - time.monotonic(), 0)) * 1000),
            model=req.model.token if req.model is not None else None,
            method=req.method,
            num_ctx=req.num_ctx or 0,
            unload=req.unload,
            keep_alive=req.keep_alive,
            expires_now=req.expires_now,
            echo_model=req.echo_model if req.upstream_model else None,
            upstream_model=req.upstream_model if req.echo_model else None,
            trace=req.trace,
            now=now,
            stream=req.streams,
            reply=self.subjects.reply(self.id, rid) if queued else None,
            window=self.reply_window,
        )
        payload = req.body
        hdrs = envelope.headers()
        limit = self.nc.max_payload
        large = req.stream is not None or not fits(len(payload), hdrs, limit)
        if large:  # the body stays here and is served in chunks (`LargeBodies`)
            size = req.stream.size if req.stream is not None else len(payload)
            envelope = msgspec.structs.replace(envelope, body_size=size, origin=self.id)
            hdrs = envelope.headers()
            if not fits(0, hdrs, limit):
                raise BadRequest("request headers too large")
        call = Call(rid, self.reply_buffer)
        self._calls[rid] = call
        if agent is not None:
            self.claimed(call, agent)
        if large:
            self._bodies.keep(rid, req.stream if req.stream is not None else payload)
            payload = b""
        return call, hdrs, payload

    def agent_gone(self, agent_id: str) -> int:
        """``agent_id`` left the fleet (its key was deleted: it stopped, or a registry found it
        dead): every call it holds ends now, as if it had said so, instead of at the idle timeout. A
        call before its head fails over (``agent_unavailable`` is retryable); one streaming ends
        with that error. Returns how many calls it ended."""
        end = {
            H.KIND: H.END_KIND,
            H.ERROR_CODE: AgentUnavailable.code,
            H.ERROR: f"agent {agent_id} left the fleet",
        }
        self.unanswered.pop(agent_id, None)
        ended = 0
        for call in list(self._calls.values()):
            if call.agent == agent_id:
                call.put(Msg(_client=self.nc, subject=self.reply_subject(call), headers=dict(end)))
                ended += 1
        if ended:
            log.warning("agent %s left the fleet holding %d of our calls: ended them", agent_id, ended)
        return ended

    def unanswering(self, heard: Callable[[str], float | None]) -> set[str]:
        """Agents that let a request go unanswered (`_unanswered`) and whose state has not been
        ``heard`` (monotonic time, None: gone from the fleet) since; the others are forgotten."""
        if not self.unanswered:  # the common case
            return set()
        for agent, since in list(self.unanswered.items()):
            at = heard(agent)
            if at is None or at > since:
                del self.unanswered[agent]
        return set(self.unanswered)

    def epoch(self) -> int:
        """How many times this sender's connection came back so far (`_unanswered`)."""
        return int(self.nc.stats["reconnects"])

    def held(self, epoch: int) -> bool:
        """Whether this sender's connection is up and has not come back since ``epoch``: a silence
        across its own outage says nothing of the agent, whose messages may have been lost with it."""
        return self.nc.is_connected and self.epoch() == epoch

    def _unanswered(self, agent: str | None, epoch: int) -> None:
        """Note that ``agent`` let a request go unanswered; only for a sender with a fleet view
        (``members``), whose planner reads it and whose view says when an agent is gone; and only
        when this sender's own connection held since ``epoch`` (`epoch`, taken when the wait
        began): a wait across its own NATS outage says nothing of the agent, whose answer may have
        been lost with the connection."""
        if agent is None or self._members is None:
            return
        if self.held(epoch):
            self.unanswered[agent] = time.monotonic()

    def reply_subject(self, call: Call) -> str:
        return self.subjects.reply(self.id, call.rid)

    def claimed(self, call: Call, agent: str) -> None:
        """``agent`` holds ``call`` now (it claimed it, or the call went to it directly); counted
        once, however often it is said."""
        if call.agent is not None:
            return
        call.agent = agent
        self._outstanding[agent] = self._outstanding.get(agent, 0) + 1

    def release(self, call: Call) -> bool:
        """Unregister ``call`` and its large body, and stop counting it against its agent; False
        when it was released already."""
        self._bodies.drop(call.rid)
        if self._calls.pop(call.rid, None) is None:
            return False
        agent = call.agent
        if agent and agent in self._outstanding:
            self._outstanding[agent] -= 1
            if self._outstanding[agent] <= 0:
                del self._outstanding[agent]
        return True

    async def cancel(self, call: Call) -> None:
        """Tell the agent holding ``call`` (if any) to drop it."""
        if call.agent:
            await self._send_cancel(call.agent, call.rid)

    async def _send_cancel(self, agent: str, rid: str) -> None:
        try:
            await self.nc.publish(
                self.subjects.agent_ctl(agent), b"", headers={H.CTL: H.CANCEL, H.REQUEST: rid}
            )
        except nats.errors.Error as e:  # the connection is closing: the agent's deadline ends it
            log.debug("cannot tell %s to cancel %s: %s", agent, rid, e)

    # -- attempts --------------------------------------------------------------------------------
    async def attempt(
        self,
        req: WorkRequest,
        subject: str,
        agent: str | None,
        deadline: float,
        *,
        service: bool = False,
        now: bool = False,
    ) -> Reply | Outcome | Failure:
        """Publish ``req`` on ``subject`` (an agent's own when ``agent`` is named; a service's queue
        group when ``service``) and wait for its head: for its claim, the claim timeout, or the warm
        one on a subject free slots share. A shared subject that answers busy is tried again a few
        times. ``now``: an agent named starts it on a free slot or answers busy, never queues it."""
        busy_retries = 0 if agent else WARM_BUSY_RETRIES
        while True:
            outcome = await self._attempt_once(req, subject, agent, deadline, service, now)
            if outcome is Outcome.BUSY and busy_retries > 0:
                busy_retries -= 1
                continue
            return outcome

    async def _attempt_once(
        self,
        req: WorkRequest,
        subject: str,
        agent: str | None,
        deadline: float,
        service: bool,
        now: bool = False,
    ) -> Reply | Outcome | Failure:
        call, hdrs, payload = self.register(req, agent, deadline, now=now)
        keep = False
        try:
            template = self.subjects.agent_work_template if agent else self.subjects.work_template
            # the span lasts until the head or the failure: an attempt that fails over is its own error
            with publish_span(template, subject, hdrs, tracer=self._tracer) as span:
                epoch = self.epoch()
                await self.nc.publish(subject, payload, reply=self.reply_subject(call), headers=hdrs)
                within = self.warm_claim_timeout if agent is None and not service else self.claim_timeout
                try:
                    msg = await self._first(call, service, within)
                except TimeoutError:
                    log.warning("no claim from %s within %.1fs", agent or subject, within)
                    self._unanswered(agent, epoch)
                    outcome: Reply | Outcome | Failure = Outcome.FAILED
                else:
                    outcome = await self.handshake(call, msg, subject)
                why = (
                    outcome.value
                    if isinstance(outcome, Outcome)
                    else ""
                    if isinstance(outcome, Reply)
                    else "failed"
                )
                attempted(span, call.agent, why, failed=why == "failed")
            keep = isinstance(outcome, Reply)
            return outcome
        except asyncio.CancelledError:
            await asyncio.shield(self.cancel(call))
            raise
        finally:
            if not keep:
                self.release(call)

    async def _first(self, call: Call, service: bool, within: float) -> Msg:
        """The first reply message from a sender this call may believe (`_believed`), within
        ``within`` seconds; others are logged and skipped."""
        deadline = time.monotonic() + within
        while True:  # one wait in the usual case: `call.next` holds the only timeout
            msg = await call.next(max(deadline - time.monotonic(), 0.0))
            if self._believed(call, msg, service):
                return msg

    def _believed(self, call: Call, msg: Msg, service: bool) -> bool:
        """A reply that names its sender (a claim, a claiming head, busy) is believed from the agent
        the call went to, or, on a shared subject, from an agent of the fleet (any sender of a
        service's queue group)."""
        sender = (msg.headers or {}).get(H.AGENT)
        if sender is None or service:
            return True
        if call.agent is not None:
            ok = sender == call.agent
        else:
            ok = self._members is None or self._members(sender)
        if not ok:
            log.warning("ignoring a reply to %s from %r, which it was not sent to", call.rid, sender[:80])
        return ok

    async def handshake(self, call: Call, msg: Msg, source: str) -> Reply | Outcome | Failure:
        """From the first reply message to the head: claim, pings, then head (or why not). The call
        stays registered; the `Reply` returned owns it."""
        mh = msg.headers or {}
        if mh.get(H.NATS_STATUS) == "503":
            return Outcome.NO_RESPONDERS
        kind = mh.get(H.KIND)
        if kind == H.BUSY:
            return Outcome.BUSY
        # a claim, or a head that claims too (an agent whose reply beat its claim's short delay)
        if kind != H.CLAIM and not (kind == H.HEAD and H.AGENT in mh):
            log.warning("unexpected first reply %r from %s", kind, source)
            return Outcome.FAILED
        if call.agent is None and (agent := mh.get(H.AGENT)):
            self.claimed(call, agent)
        epoch = self.epoch()
        while kind != H.HEAD:
            try:
                msg = await call.next(self.idle_timeout)
            except TimeoutError:
                log.warning("agent %s went silent before answering; trying elsewhere", call.agent)
                self._unanswered(call.agent, epoch)
                await self.cancel(call)
                return Outcome.FAILED
            mh = msg.headers or {}
            if H.AGENT in mh and mh[H.AGENT] != call.agent:
                log.warning("ignoring a reply to %s from %r, not its claimant", call.rid, mh[H.AGENT][:80])
                kind = None
                continue
            kind = mh.get(H.KIND)
            if kind in (H.PING, H.HEAD):
                continue
            if kind == H.END_KIND:
                err = end_error(mh)
                if err.retryable and call.agent:
                    log.warning("agent %s failed before answering (%s); trying elsewhere", call.agent, err)
                    return Failure(call.agent, err)
                raise err
            if kind == H.BUSY:
                return Outcome.BUSY
            log.warning("unexpected reply %r from %s before head", kind, call.agent)
        return Reply(
            self,
            call,
            int(mh.get(H.STATUS, "200")),
            mh.get(H.CONTENT_TYPE, "application/json; charset=utf-8"),
            msg.data,
            ended=mh.get(H.END) == "1",
            idle_timeout=self.idle_timeout,
            window=int(w) if (w := mh.get(H.WINDOW, "")).isascii() and w.isdigit() else 0,
        )

    async def send_to(self, agent_id: str, req: WorkRequest, *, timeout: float) -> Reply:
        """Send to one agent's direct subject; no fallback (fan-outs, pinned agents). ``timeout``
        is the request's deadline at the agent."""
        outcome = await self.attempt(
            req, self.subjects.agent_work(agent_id), agent_id, time.monotonic() + timeout
        )
        if isinstance(outcome, Reply):
            return outcome
        if isinstance(outcome, Failure):  # its error, naming the agent among those of a fan-out
            raise from_code(outcome.error.code, f"agent {agent_id}: {outcome.error.message}")
        if outcome is Outcome.BUSY:
            raise NoCapacity()
        raise AgentUnavailable(f"agent {agent_id} did not answer")

    async def send_service(self, subject: str, req: WorkRequest, *, timeout: float) -> Reply | None:
        """Send to a service's queue-group subject (e.g. the registry); None when none is running."""
        outcome = await self.attempt(req, subject, None, time.monotonic() + timeout, service=True)
        if isinstance(outcome, Reply):
            return outcome
        if isinstance(outcome, Failure):
            raise outcome.error
        if outcome is Outcome.NO_RESPONDERS:
            return None
        raise AgentUnavailable(f"no answer on {subject}")
