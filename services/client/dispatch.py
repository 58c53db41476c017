"""Send one Ollama request to the fleet and relay the reply stream back, with failover.

Under ``auto`` (the default; `Dispatcher._send_auto`), in order:

1. the conversation's own agent (its prompt cache), when the cost model still ranks it first;
2. the warm claim subjects (requests at default runner options): NATS hands the request to an agent
   with the model loaded and a free slot, or answers "no responders" at once;
3. an agent that by the fleet state can start it now (a free slot on a matching runner);
4. nothing can start it now: if the cheapest place is a load (nobody has a matching runner, or a
   load beats the queue) and no load of this model is under way, the registry places it — one load
   per model at a time, fleet-wide — and this request goes to that agent; every other request waits
   in the fleet-wide FIFO (`corral.runtime.workqueue`), which agents serve before new work as
   slots free. Requests with their own ``num_ctx`` wait at the agent whose runner will match;
5. the queue's deadline passes: Ollama's 503 ``server busy``.

With ``auto_pull`` on, a request for a model no agent has (any strategy) first pulls it onto one
agent through the registry (`Dispatcher.auto_pull`; one pull per model however many requests ask),
then is routed as above; a model that cannot be pulled is Ollama's 404 as before.

The seed strategies (round_robin, random, ...) use the plan below instead:

1. warm claim subjects — ``work.{vendor}.{model}`` for a pin, then (unless strict) ``work.any.{model}``.
   Only agents with the model loaded and a free slot listen there, so NATS hands the request to one
   that can start it now, or answers "no responders" at once;
2. direct subjects of agents that have the model — loaded first, then loading, then on disk, least
   busy first. An agent with no free slot queues the request locally (bounded) or answers ``busy``;
3. when every candidate is busy, wait for the fleet to change (a KV watch event, not a poll) and
   start again, until the request's queue deadline; then Ollama's 503 ``server busy``.

An attempt that fails before the agent sent its ``head`` (no claim in time, the agent went silent,
the agent could not reach its Ollama) moves on to the next candidate; the client never notices.
After the head, failures end the stream with an error (`Reply.batches` raises).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import msgspec
from corral.client.fleet import FleetView, pull_order
from corral.client.routing import DEFAULT_STRATEGY, Route, Router, loading_for, warm
from corral.client.sessions import Sessions
from corral.protocol import headers as H
from corral.protocol.envelope import HEADER_HEADROOM, RequestEnvelope
from corral.protocol.errors import (
    AgentUnavailable,
    BadRequest,
    ModelNotFound,
    NoCapacity,
    from_code,
)
from corral.protocol.messages import AgentState, PlaceRequest, place_reply_decoder
from corral.protocol.names import ANY_VENDOR, ModelName, parse_name, split_vendor_pin
from corral.protocol.subjects import Subjects
from corral.runtime.tasks import cancel_and_wait
from corral.runtime.telemetry import publish_span
from corral.runtime.workqueue import Queued, QueueFull, enqueue, withdraw
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

WARM_BUSY_RETRIES = 3
PULL_FAILURE_MEMORY_S = 10.0  # an auto-pull that failed answers the same model's requests this long


@dataclass(frozen=True)
class DispatchSettings:
    claim_timeout: float = 2.0  # an agent must claim within this
    idle_timeout: float = 10.0  # a claimed request silent this long means a dead agent
    queue_timeout: float = 60.0  # how long a request may wait for capacity before 503
    ping_interval: float = 2.0  # told to agents: ping at least this often while silent
    strategy: str = DEFAULT_STRATEGY  # routing when a request names none
    queue: bool = True  # wait in the fleet-wide JetStream queue (False: wait at the agents)
    load_grace_s: float = 1.0  # a load this gateway started counts as under way this long before
    # the agent's state shows it (the state follows the send by a publish)
    recheck_s: float = 1.0  # a queued request checks this often that someone will still serve it
    auto_pull: bool = False  # a model no agent has is pulled onto one (through the registry) first


@dataclass
class WorkRequest:
    """One Ollama call to route. ``body`` is the client's bytes, sent on unchanged."""

    endpoint: str
    body: bytes
    model: ModelName | None = None
    vendor: str | None = None  # vendor pin
    strict: bool = False  # the pin may not fall back to other vendors
    echo_model: str | None = None  # when a pin was stripped from the body: restore in replies
    upstream_model: str | None = None
    method: str = "POST"
    trace: dict[str, str] = field(default_factory=dict)
    strategy: str | None = None  # None = the dispatcher's default (see corral.client.routing)
    num_ctx: int | None = None  # the request's runner context (options.num_ctx); None = default
    session: str | None = None  # conversation key (`corral.gateway.bodies.session`)
    follow_up: bool = False  # the request continues that conversation
    unload: bool = False  # keep_alive 0 with nothing to run (the agent re-reads /api/ps after it)


_any = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()


def model_work(
    endpoint: str,
    body: bytes,
    raw_model: str,
    *,
    vendor: str | None = None,
    strict: bool = False,
    strategy: str | None = None,
) -> WorkRequest:
    """A routed request for ``raw_model`` as the client spelt it (``amd/llama3``, ``llama3@amd`` ...).

    A vendor pin in the name wins over ``vendor``; it is stripped from the body Ollama sees and
    restored in its replies. Raises `InvalidModelName` or `BadRequest` for unusable names.
    """
    if not raw_model:
        raise BadRequest("model is required")
    pinned, name = split_vendor_pin(raw_model)
    vendor = pinned or vendor
    work = WorkRequest(
        endpoint=endpoint,
        body=body,
        model=parse_name(name),
        vendor=vendor,
        strict=strict and vendor is not None,
        strategy=strategy,
    )
    if name != raw_model:
        obj = _any.decode(body)
        obj["model"] = name
        work.body = _enc.encode(obj)
        work.echo_model, work.upstream_model = raw_model, name
    return work


def _place_request(
    req: WorkRequest, route: Route, proposal: str, exclude: tuple[str, ...] = ()
) -> PlaceRequest:
    """The registry's placement question (``place``, or ``unplace`` for a failed load) for ``req``."""
    assert req.model is not None
    return PlaceRequest(
        model=route.key,
        token=req.model.token,
        vendor=req.vendor,
        strict=req.strict,
        num_ctx=req.num_ctx,
        proposal=proposal,
        exclude=exclude,
    )


class _Outcome(enum.Enum):
    NO_RESPONDERS = "no responders"
    BUSY = "busy"
    FAILED = "failed"


class _Call:
    __slots__ = ("agent", "queue", "rid")

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.agent: str | None = None

    async def next(self, timeout: float) -> Msg:
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        # asyncio.timeout, not wait_for: no task per wait, and a cancel is never swallowed when
        # the message arrives at the same moment (wait_for can lose it on Python 3.11)
        async with asyncio.timeout(timeout):
            return await self.queue.get()


class Reply:
    """An open reply from the agent that claimed the request: status, content type, body stream."""

    def __init__(
        self, dispatcher: Dispatcher, call: _Call, status: int, content_type: str, first: bytes, ended: bool
    ) -> None:
        self._d = dispatcher
        self._call = call
        self.agent = call.agent or ""
        self.status = status
        self.content_type = content_type
        self.first = first
        self.ended = ended
        self._data_msgs = 0
        if ended:
            self._d._forget(call)

    async def batches(self) -> AsyncIterator[bytes]:
        """The body after ``first``: each item is everything that had arrived, joined.

        Raises `CorralError` when the agent reports a failure or goes silent mid-stream.
        """
        if self.ended:
            return
        call, timeout = self._call, self._d.settings.idle_timeout
        try:
            while True:
                try:
                    msg = await call.next(timeout)
                except TimeoutError:
                    raise AgentUnavailable(f"agent {self.agent} stopped responding") from None
                parts: list[bytes] = []
                while True:
                    hdrs = msg.headers
                    if not hdrs:
                        self._data_msgs += 1
                        parts.append(msg.data)
                    elif hdrs.get(H.KIND) == H.END_KIND:
                        self.ended = True
                        if parts:
                            yield b"".join(parts)
                        self._check_end(hdrs)
                        return
                    try:
                        msg = call.queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                if parts:
                    yield b"".join(parts) if len(parts) > 1 else parts[0]
        finally:
            await self.close()

    def _check_end(self, hdrs: dict[str, str]) -> None:
        if H.ERROR_CODE in hdrs:
            raise from_code(hdrs[H.ERROR_CODE], hdrs.get(H.ERROR, "request failed"))
        sent = int(hdrs.get(H.SEQ, self._data_msgs))
        if sent != self._data_msgs:
            raise AgentUnavailable(
                f"lost {sent - self._data_msgs} of {sent} reply messages from {self.agent}"
            )

    async def lines(self) -> AsyncIterator[bytes]:
        """The body as NDJSON lines (blank ones skipped), as they complete."""
        tail = self.first
        async for batch in self.batches():
            tail += batch
            *complete, tail = tail.split(b"\n")
            for raw in complete:
                if raw.strip():
                    yield raw
        for raw in tail.split(b"\n"):
            if raw.strip():
                yield raw

    async def read(self) -> bytes:
        """The whole body (first bytes plus the rest)."""
        return self.first + b"".join([b async for b in self.batches()])

    async def close(self) -> None:
        """Release the call; cancels the work on the agent if the stream has not ended."""
        if self._d._forget(self._call) and not self.ended:
            await self._d._cancel(self._call)


class Dispatcher:
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        fleet: FleetView,
        settings: DispatchSettings | None = None,
        *,
        tracer: Tracer | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self.nc = nc
        self._js = nc.jetstream()
        self._tracer = tracer
        self.sessions = sessions
        self._loads: dict[tuple[str, int], tuple[str, float]] = {}  # (model, ctx) → (agent, since)
        self._waiting: dict[str, int] = {}  # model key → this gateway's requests in the fleet queue
        self._pulls: dict[tuple[str, str | None], asyncio.Future[bool]] = {}  # auto-pulls under way
        self.subjects = subjects
        self.fleet = fleet
        self.settings = settings or DispatchSettings()
        self.id = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self._calls: dict[str, _Call] = {}
        self._bodies: dict[str, bytes] = {}
        self._outstanding: dict[str, int] = {}  # agent id → direct sends not yet finished
        self._subs: list[Subscription] = []
        self._router = Router()
        self._reply_prefix = len(self.subjects.reply(self.id, "x")) - 1
        self._body_prefix = len(self.subjects.body(self.id, "x")) - 1

    async def start(self) -> None:
        self._subs.append(
            await self.nc.subscribe(
                self.subjects.reply_all(self.id), cb=self._on_reply, pending_bytes_limit=512 * 1024 * 1024
            )
        )
        self._subs.append(await self.nc.subscribe(self.subjects.body_all(self.id), cb=self._on_body))

    async def stop(self) -> None:
        await cancel_and_wait(list(self._pulls.values()))
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    # -- reply mux ---------------------------------------------------------------------------
    async def _on_reply(self, msg: Msg) -> None:
        call = self._calls.get(msg.subject[self._reply_prefix :])
        if call is not None:
            call.queue.put_nowait(msg)
        elif msg.headers and msg.headers.get(H.KIND) in (H.CLAIM, H.HEAD) and H.AGENT in msg.headers:
            # a claim (or claiming head) for a request we already gave up on: tell that agent to drop it
            agent = msg.headers.get(H.AGENT)
            rid = msg.subject[self._reply_prefix :]
            if agent:
                await self._send_cancel(agent, rid)

    async def _on_body(self, msg: Msg) -> None:
        body = self._bodies.get(msg.subject[self._body_prefix :])
        if body is None or not msg.reply:
            return
        offset = int(msg.data or b"0")
        chunk = self.nc.max_payload - HEADER_HEADROOM
        await self.nc.publish(msg.reply, body[offset : offset + chunk], headers={H.BODY_SIZE: str(len(body))})

    def _forget(self, call: _Call) -> bool:
        self._bodies.pop(call.rid, None)
        if self._calls.pop(call.rid, None) is None:
            return False
        if call.agent and call.agent in self._outstanding:
            self._outstanding[call.agent] -= 1
            if self._outstanding[call.agent] <= 0:
                del self._outstanding[call.agent]
        return True

    async def _cancel(self, call: _Call) -> None:
        if call.agent:
            await self._send_cancel(call.agent, call.rid)

    async def _send_cancel(self, agent: str, rid: str) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(
                self.subjects.agent_ctl(agent), b"", headers={H.CTL: H.CANCEL, H.REQUEST: rid}
            )

    # -- routing -----------------------------------------------------------------------------
    async def send(self, req: WorkRequest, *, queue_timeout: float | None = None) -> Reply:
        """Route ``req`` to an agent and return once that agent's reply has begun (its head)."""
        deadline = time.monotonic() + (
            self.settings.queue_timeout if queue_timeout is None else queue_timeout
        )
        failed: set[str] = set()
        strategy = req.strategy or self.settings.strategy
        auto = req.model is not None and strategy == "auto"
        session_agent = None
        if auto and req.session and req.follow_up and self.sessions is not None:
            session_agent = await self.sessions.lookup(req.session)
        pulled = False
        while True:
            try:
                reply = await self._send_once(req, deadline, failed, strategy, session_agent)
            except ModelNotFound:
                if pulled or not self.settings.auto_pull or req.model is None:
                    raise
                pulled = True
                if not await self.auto_pull(req):
                    raise
                deadline = time.monotonic() + (  # the wait for capacity starts now
                    self.settings.queue_timeout if queue_timeout is None else queue_timeout
                )
                continue
            if reply is not None:
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoCapacity()
            await self.fleet.wait_changed(min(remaining, 1.0))

    async def _send_once(
        self, req: WorkRequest, deadline: float, failed: set[str], strategy: str, session_agent: str | None
    ) -> Reply | None:
        """One pass over the fleet under ``strategy``; None when nothing could take it now."""
        if req.model is not None and strategy == "auto":
            reply = await self._send_auto(req, deadline, failed, session_agent)
            if reply is not None and req.session and self.sessions is not None:
                self.sessions.remember(req.session, reply.agent)
            return reply
        for subject, agent in self._plan(req, failed, strategy):
            outcome = await self._attempt(req, subject, agent, deadline)
            if isinstance(outcome, Reply):
                return outcome
            if outcome is _Outcome.FAILED and agent is not None:
                failed.add(agent)
        return None

    async def auto_pull(self, req: WorkRequest) -> bool:
        """Pull ``req``'s model onto one agent (of the pinned vendor, when strict) and wait until the
        fleet shows it there; False when it could not be pulled. Concurrent requests for one model
        share one pull."""
        assert req.model is not None
        key = (req.model.key, req.vendor if req.strict else None)
        pull = self._pulls.get(key)
        if pull is None:
            pull = asyncio.ensure_future(self._pull(req.model, key[1]))
            self._pulls[key] = pull

            def forget(done: asyncio.Future[bool]) -> None:
                # a failed pull answers the requests after it for a while (no pull per request
                # for a model that does not exist); a successful one is done with
                delay = 0.0 if done.cancelled() or done.result() else PULL_FAILURE_MEMORY_S
                asyncio.get_running_loop().call_later(delay, lambda: self._pulls.pop(key, None))

            pull.add_done_callback(forget)
        return await asyncio.shield(pull)

    async def _pull(self, model: ModelName, vendor: str | None) -> bool:
        log.info("no agent has %s: pulling it", model.display)
        body = _enc.encode({"model": model.display, "stream": False, "replicas": 1, "vendor": vendor})
        work = WorkRequest("/api/pull", body)
        try:
            reply = await self.send_service(
                self.subjects.registry("pull"), work, timeout=self.settings.claim_timeout
            )
            if reply is None:  # no registry: the agent the registry would have chosen
                agents = pull_order(self.fleet, model.key, vendor)
                if not agents:
                    return False
                reply = await self.send_to(agents[0].id, WorkRequest("/api/pull", body))
            data = await reply.read()
        except Exception as e:  # CorralError, or NATS going away under a stopping gateway
            log.warning("pulling %s failed: %s", model.display, e)
            return False
        if reply.status != 200:
            log.warning("pulling %s failed: %s", model.display, data.decode(errors="replace")[:300])
            return False
        # the agent re-reads its Ollama after a pull and publishes its state: wait for that
        deadline = time.monotonic() + self.settings.claim_timeout + self.settings.idle_timeout
        while not any(vendor in (None, a.vendor) for a in self.fleet.with_model(model.key)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await self.fleet.wait_changed(remaining)
        return True

    async def send_to(self, agent_id: str, req: WorkRequest, *, timeout: float | None = None) -> Reply:
        """Send to one agent's direct subject; no fallback (fan-out of unloads, pinned agents)."""
        deadline = time.monotonic() + (self.settings.queue_timeout if timeout is None else timeout)
        outcome = await self._attempt(req, self.subjects.agent_work(agent_id), agent_id, deadline)
        if isinstance(outcome, Reply):
            return outcome
        if outcome is _Outcome.BUSY:
            raise NoCapacity()
        raise AgentUnavailable(f"agent {agent_id} did not answer")

    async def send_service(self, subject: str, req: WorkRequest, *, timeout: float) -> Reply | None:
        """Send to a service's queue-group subject (e.g. the registry); None when none is running."""
        outcome = await self._attempt(req, subject, None, time.monotonic() + timeout)
        if isinstance(outcome, Reply):
            return outcome
        if outcome is _Outcome.NO_RESPONDERS:
            return None
        raise AgentUnavailable(f"no answer on {subject}")

    def _plan(self, req: WorkRequest, failed: set[str], strategy: str) -> Iterator[tuple[str, str | None]]:
        if req.model is None:  # not a model request: any live agent will do
            for a in sorted(self.fleet.agents(), key=self._load):
                if a.status == "active" and a.id not in failed:
                    yield self.subjects.agent_work(a.id), a.id
            return
        usable = self._usable(req, failed)
        route = Route(key=req.model.key, vendor=req.vendor, strict=req.strict, num_ctx=req.num_ctx)
        for a in self._router.rank(strategy, route, usable, self._outstanding):
            yield self.subjects.agent_work(a.id), a.id

    def _usable(self, req: WorkRequest, failed: set[str]) -> list[AgentState]:
        """Active holders of the request's model not yet failed; ModelNotFound when none hold it."""
        assert req.model is not None
        holders = self.fleet.with_model(req.model.key)
        if req.vendor and req.strict:
            holders = [a for a in holders if a.vendor == req.vendor]
        if not holders:
            raise ModelNotFound(req.model.display)
        return [a for a in holders if a.status == "active" and a.id not in failed]

    # -- auto ----------------------------------------------------------------------------------
    async def _send_auto(
        self, req: WorkRequest, deadline: float, failed: set[str], session_agent: str | None
    ) -> Reply | None:
        """One pass of the auto plan (module docstring); None when the caller should wait and retry."""
        assert req.model is not None
        tried: set[str] = set()

        async def direct(a: AgentState) -> Reply | None:
            tried.add(a.id)
            outcome = await self._attempt(req, self.subjects.agent_work(a.id), a.id, deadline)
            if isinstance(outcome, Reply):
                return outcome
            if outcome is _Outcome.FAILED:
                failed.add(a.id)
            return None

        def route_for(usable: list[AgentState]) -> Route:
            session = session_agent if any(a.id == session_agent for a in usable) else None
            return Route(
                key=req.model.key,  # type: ignore[union-attr]
                vendor=req.vendor,
                strict=req.strict,
                num_ctx=req.num_ctx,
                session_agent=session,
            )

        # 1. the conversation's agent, while the cost model still puts it first (its prompt cache)
        if session_agent is not None:
            usable = self._usable(req, failed)
            ranked = self._router.rank("auto", route_for(usable), usable, self._outstanding)
            if ranked and ranked[0].id == session_agent:
                if (reply := await direct(ranked[0])) is not None:
                    return reply
        # 2. warm claims: an agent with a free slot on a default-context runner takes it now. The
        # fast path: no ranking, no fleet scan — NATS knows who has a free slot
        if req.num_ctx is None:
            token = req.model.token
            subjects = [self.subjects.work(req.vendor, token)] if req.vendor else []
            if not (req.vendor and req.strict):
                subjects.append(self.subjects.work(ANY_VENDOR, token))
            for subject in subjects:
                outcome = await self._attempt(req, subject, None, deadline)
                if isinstance(outcome, Reply):
                    return outcome
        usable = self._usable(req, failed)
        route = route_for(usable)
        ranked = self._router.rank("auto", route, usable, self._outstanding)
        # 3. whoever can start it now by the fleet state (claims lag a little behind it)
        for a in ranked:
            if a.id not in tried and a.id not in failed and warm(route, a) and self._busy(a) < a.parallel:
                if (reply := await direct(a)) is not None:
                    return reply
        # 4. nothing can start it now: a load, or a wait (ranked again: the attempts above moved
        # the outstanding counts the costs are made of)
        live = self._router.rank(
            "auto", route, [a for a in usable if a.id not in failed], self._with_queue(route, usable)
        )
        if not live:
            return None
        top = live[0]
        if (
            not warm(route, top)
            and not self._loading_at(route, top)
            and not self._load_under_way(route, live)
        ):
            target, mine = await self._place(req, route, top, failed)
            if target is not None and mine:
                reply = await direct(target)
                if reply is None or reply.status >= 400:
                    # the load failed (Ollama's error, e.g. not enough memory) or never started: the
                    # next request must not wait on it as if it were under way
                    await self._unplace(req, route, target)
                return reply
        if req.num_ctx is None and self.settings.queue:
            return await self._queued(req, route, deadline, failed)
        for a in live:  # its own num_ctx: wait at the agent whose runner will match soonest
            if warm(route, a) or self._loading_at(route, a):
                return await direct(a)
        return None

    def _with_queue(self, route: Route, usable: list[AgentState]) -> dict[str, int]:
        """Outstanding sends plus this gateway's requests waiting in the fleet queue for ``route``'s
        model, shared out over the agents that serve it: a long queue makes a load elsewhere win."""
        waiting = self._waiting.get(route.key, 0)
        if not waiting:
            return self._outstanding
        serving = [a.id for a in usable if warm(route, a)]
        if not serving:
            return self._outstanding
        share = -(-waiting // len(serving))
        out = dict(self._outstanding)
        for agent_id in serving:
            out[agent_id] = out.get(agent_id, 0) + share
        return out

    def _busy(self, a: AgentState) -> int:
        return a.in_flight + a.queued + self._outstanding.get(a.id, 0)

    def _loading_at(self, route: Route, a: AgentState) -> bool:
        """A load for ``route`` is under way at ``a``: its state says so, or this gateway sent one
        there moments ago (agent state lags the send by up to its publish interval)."""
        if loading_for(route, a):
            return True
        marker = self._loads.get((route.key, route.num_ctx or 0))
        if marker is None or marker[0] != a.id:
            return False
        return time.monotonic() - marker[1] < self.settings.load_grace_s and not warm(route, a)

    def _load_under_way(self, route: Route, agents: list[AgentState]) -> bool:
        return any(self._loading_at(route, a) for a in agents)

    async def _place(
        self, req: WorkRequest, route: Route, proposal: AgentState, failed: set[str]
    ) -> tuple[AgentState | None, bool]:
        """Where ``route``'s model loads, and whether this request is the one to load it there.

        The registry arbitrates fleet-wide (a KV marker per model and context); with no registry
        running, this gateway's own markers keep it to one load at a time here.
        """
        ask = _place_request(req, route, proposal.id, exclude=tuple(sorted(failed)))
        agent_id, mine = proposal.id, True
        try:
            msg = await self.nc.request(self.subjects.registry("place"), _enc.encode(ask), timeout=2.0)
            answer = place_reply_decoder.decode(msg.data)
            if answer.agent:
                agent_id, mine = answer.agent, answer.mine
        except Exception as e:  # no registry (or it is slow): decide here
            log.debug("placing %s locally: %s", route.key, e)
            marker = self._loads.get((route.key, route.num_ctx or 0))
            at = self.fleet.get(marker[0]) if marker is not None else None
            if at is not None and at.id not in failed and self._loading_at(route, at):
                agent_id, mine = at.id, False
        if mine:
            self._loads[(route.key, route.num_ctx or 0)] = (agent_id, time.monotonic())
        return self.fleet.get(agent_id), mine

    async def _unplace(self, req: WorkRequest, route: Route, agent: AgentState) -> None:
        """Forget the load this gateway was given at ``agent`` here and at the registry."""
        key = (route.key, route.num_ctx or 0)
        marker = self._loads.get(key)
        if marker is not None and marker[0] == agent.id:
            del self._loads[key]
        ask = _place_request(req, route, agent.id)
        try:  # answered, so the next placement cannot overtake it; no registry answers at once
            await self.nc.request(self.subjects.registry("unplace"), _enc.encode(ask), timeout=1.0)
        except Exception as e:
            log.debug("no registry to unplace %s at %s: %s", route.key, agent.id, e)

    async def _queued(
        self, req: WorkRequest, route: Route, deadline: float, failed: set[str]
    ) -> Reply | None:
        """Wait in the fleet-wide queue for the next free slot; None to re-plan (nobody will serve it)."""
        assert req.model is not None
        vendor = req.vendor if (req.vendor and req.strict) else ANY_VENDOR
        call, hdrs, payload = self._prepare(req, None, deadline)
        hdrs[H.REPLY] = self.subjects.reply(self.id, call.rid)
        keep = False
        queued: Queued | None = None
        self._waiting[route.key] = self._waiting.get(route.key, 0) + 1
        try:
            try:
                queued = await enqueue(
                    self.nc, self._js, self.subjects, vendor, req.model.token, payload, hdrs
                )
            except QueueFull:
                raise NoCapacity() from None
            except Exception as e:
                log.warning("cannot queue a request for %s: %s", route.key, e)
                return None
            while True:
                remaining = deadline - time.monotonic()
                recheck = self.settings.recheck_s
                try:
                    msg = await call.next(max(min(remaining, recheck), 0.001))
                except TimeoutError:
                    if remaining <= recheck:
                        if await withdraw(self._js, queued):
                            raise NoCapacity() from None
                        # an agent took it just now: its claim is on the way
                        try:
                            msg = await call.next(self.settings.claim_timeout)
                        except TimeoutError:
                            raise NoCapacity() from None
                    else:
                        if self._someone_serves(route, failed) or not await withdraw(self._js, queued):
                            continue
                        return None  # withdrawn: nobody has or is loading the model any more
                outcome = await self._after_first(call, msg, "the queue")
                if isinstance(outcome, Reply):
                    keep = True
                    return outcome
                return None
        except asyncio.CancelledError:
            if queued is not None:
                await asyncio.shield(withdraw(self._js, queued))
            await asyncio.shield(self._cancel(call))
            raise
        finally:
            self._waiting[route.key] -= 1
            if not self._waiting[route.key]:
                del self._waiting[route.key]
            if not keep:
                self._forget(call)

    def _someone_serves(self, route: Route, failed: set[str]) -> bool:
        """Some usable agent has, or is loading, a runner for ``route``."""
        for a in self.fleet.with_model(route.key):
            if a.status == "active" and a.id not in failed and (warm(route, a) or self._loading_at(route, a)):
                return True
        return False

    def _load(self, a: AgentState) -> float:
        return (a.in_flight + a.queued + self._outstanding.get(a.id, 0)) / max(a.parallel, 1)

    async def _attempt(
        self, req: WorkRequest, subject: str, agent: str | None, deadline: float
    ) -> Reply | _Outcome:
        busy_retries = 0 if agent else WARM_BUSY_RETRIES
        while True:
            outcome = await self._attempt_once(req, subject, agent, deadline)
            if outcome is _Outcome.BUSY and busy_retries > 0:
                busy_retries -= 1
                continue
            return outcome

    def _prepare(
        self, req: WorkRequest, agent: str | None, deadline: float
    ) -> tuple[_Call, dict[str, str], bytes]:
        """Register a call for one attempt: (call, headers, payload) to publish."""
        rid = format(next(self._ids), "x")
        call = _Call(rid)
        self._calls[rid] = call
        if agent is not None:
            call.agent = agent
            self._outstanding[agent] = self._outstanding.get(agent, 0) + 1
        payload = req.body
        large = len(payload) > self.nc.max_payload - HEADER_HEADROOM
        if large:
            self._bodies[rid] = payload
        hdrs = RequestEnvelope(
            rid=rid,
            endpoint=req.endpoint,
            deadline_ms=int((time.time() + max(deadline - time.monotonic(), 0)) * 1000),
            model=req.model.token if req.model is not None else None,
            method=req.method,
            num_ctx=req.num_ctx or 0,
            unload=req.unload,
            echo_model=req.echo_model if req.upstream_model else None,
            upstream_model=req.upstream_model if req.echo_model else None,
            body_size=len(payload) if large else None,
            origin=self.id if large else None,
            trace=req.trace,
        ).headers()
        if large:
            payload = b""
        return call, hdrs, payload

    async def _attempt_once(
        self, req: WorkRequest, subject: str, agent: str | None, deadline: float
    ) -> Reply | _Outcome:
        call, hdrs, payload = self._prepare(req, agent, deadline)
        keep = False
        try:
            template = self.subjects.agent_work_template if agent else self.subjects.work_template
            with publish_span(template, subject, hdrs, tracer=self._tracer):
                await self.nc.publish(
                    subject, payload, reply=self.subjects.reply(self.id, call.rid), headers=hdrs
                )
            try:
                msg = await call.next(self.settings.claim_timeout)
            except TimeoutError:
                log.warning("no claim from %s within %.1fs", agent or subject, self.settings.claim_timeout)
                return _Outcome.FAILED
            outcome = await self._after_first(call, msg, subject)
            keep = isinstance(outcome, Reply)
            return outcome
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel(call))
            raise
        finally:
            if not keep:
                self._forget(call)

    async def _after_first(self, call: _Call, msg: Msg, source: str) -> Reply | _Outcome:
        """From the first reply message to the head: claim, pings, then head (or why not)."""
        mh = msg.headers or {}
        if mh.get(H.NATS_STATUS) == "503":
            return _Outcome.NO_RESPONDERS
        kind = mh.get(H.KIND)
        if kind == H.BUSY:
            return _Outcome.BUSY
        # a claim, or a head that claims too (an agent whose reply beat its claim's short delay)
        if kind != H.CLAIM and not (kind == H.HEAD and H.AGENT in mh):
            log.warning("unexpected first reply %r from %s", kind, source)
            return _Outcome.FAILED
        if call.agent is None:
            call.agent = mh.get(H.AGENT)
            if call.agent:
                self._outstanding[call.agent] = self._outstanding.get(call.agent, 0) + 1
        while kind != H.HEAD:
            try:
                msg = await call.next(self.settings.idle_timeout)
            except TimeoutError:
                log.warning("agent %s went silent before answering; trying elsewhere", call.agent)
                await self._cancel(call)
                return _Outcome.FAILED
            mh = msg.headers or {}
            kind = mh.get(H.KIND)
            if kind in (H.PING, H.HEAD):
                continue
            if kind == H.END_KIND:
                err = from_code(mh.get(H.ERROR_CODE, "internal"), mh.get(H.ERROR, "request failed"))
                if err.retryable:
                    log.warning("agent %s failed before answering (%s); trying elsewhere", call.agent, err)
                    return _Outcome.FAILED
                raise err
            if kind == H.BUSY:
                return _Outcome.BUSY
            log.warning("unexpected reply %r from %s before head", kind, call.agent)
        return Reply(
            self,
            call,
            int(mh.get(H.STATUS, "200")),
            mh.get(H.CONTENT_TYPE, "application/json; charset=utf-8"),
            msg.data,
            ended=mh.get(H.END) == "1",
        )
