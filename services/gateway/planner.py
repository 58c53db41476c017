"""The gateway's planner: which agent takes one Ollama request, when to load, when to queue.

Under ``auto`` (the default; `Planner._send_auto`), in order:

1. the conversation's own agent (its prompt cache), when the cost model still ranks it first;
2. the warm claim subjects (requests at default runner options): NATS hands the request to an agent
   with the model loaded and a free slot, or answers "no responders" at once;
3. an agent that by the fleet state can start it now (a free slot on a matching runner), sent with
   ``Corral-Now``: one whose slots were taken since it published its state (by other senders, or
   by requests whose claims this gateway has not read yet) answers busy rather than keeping the
   request waiting behind them, and counts as full below;
4. nothing can start it now: if the cheapest place is a load (nobody has a matching runner, or a
   load beats the queue) and no load of this model is under way, the registry places it — one load
   per model at a time, fleet-wide — and this request goes to that agent; every other request waits
   in the fleet-wide FIFO (`corral.gateway.queueing`), which agents serve before new work as
   slots free. Requests with their own ``num_ctx`` wait at the agent whose runner will match;
5. the queue's deadline passes: Ollama's 503 ``server busy``.

Batch-priority work (`corral.protocol.priority`) skips 1 and 3, claims on the batch claim subjects
in 2 (only slots an agent can spare) and waits in the queue's batch lane in 4, which agents take
after the interactive lane; after ``batch_aging_s`` there it moves to the interactive lane's end,
so it is never starved for longer than that.

With ``auto_pull`` on, a request for a model no agent has (any strategy) first pulls it onto one
agent through the registry (`corral.gateway.autopull`; one pull per model however many requests ask),
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
the agent could not reach its Ollama, Ollama's 5xx) moves on to the next candidate; the client never
notices. An agent that failed it is not tried again for it, nor, for a while, for its model's next
requests (`corral.gateway.breaker`): those go to other agents by name. After the head, failures end
the stream with an error (`Reply.batches` raises).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

from corral.gateway.autopull import AutoPuller
from corral.gateway.breaker import Breakers
from corral.gateway.metrics import (
    LOAD,
    QUEUED,
    SESSION,
    WARM,
    Decision,
    GatewayMetrics,
    explain,
    new_decision,
)
from corral.gateway.outage import Outage
from corral.gateway.placement import Loads
from corral.gateway.policy import Candidate, candidates, quant_match, substitute
from corral.gateway.queueing import FleetQueue
from corral.gateway.sessions import Sessions
from corral.gateway.settings import GatewaySettings
from corral.gateway.shutdown import Shutdown
from corral.protocol.endpoints import MODEL_ENDPOINTS
from corral.protocol.errors import BackendError, CorralError, ModelNotFound, NoCapacity
from corral.protocol.messages import AgentState
from corral.protocol.names import ANY_VENDOR
from corral.protocol.priority import BATCH
from corral.routing import Route, Router, load, route_ctx, slots_taken, warm
from corral.runtime.fleet import FleetView
from corral.runtime.policy import PolicyStore
from corral.runtime.tasks import cancel_and_wait
from corral.transport import Failure, Outcome, Reply, Transport, WorkRequest
from corral.views import listed_as

log = logging.getLogger(__name__)


class Planner:
    """Routes requests over one `Transport` from one fleet view, under the gateway's settings.

    ``router`` carries the strategies' state (round-robin cursors, the random generator): pass
    ``Router(seed=N)`` for a reproducible ``random`` strategy.
    """

    def __init__(
        self,
        transport: Transport,
        fleet: FleetView,
        settings: GatewaySettings,
        *,
        router: Router | None = None,
        sessions: Sessions | None = None,
        metrics: GatewayMetrics | None = None,
        policy: PolicyStore | None = None,
    ) -> None:
        self.transport = transport
        self.fleet = fleet
        self.settings = settings
        self.sessions = sessions
        self.router = router or Router()
        self.loads = Loads(transport.nc, transport.subjects, fleet, grace_s=settings.load_grace_s)
        self.shutdown = Shutdown()  # the gateway's stop, as its relays and its queue act on it
        self.outage = Outage(settings.nats_outage_s)  # how long NATS has been away, as requests see it
        self.queue = FleetQueue(transport, fleet, self.loads, settings, self.shutdown, self.outage)
        self.pulls = AutoPuller(transport, fleet, settings)
        self.metrics = metrics or GatewayMetrics(fleet)
        self.policy = policy  # aliases and fallbacks (None: every model serves only itself)
        self._outliving: set[asyncio.Task[Any]] = set()  # work whose client left (`outlive_client`)
        self.breakers = Breakers()  # agents that lately failed a model's requests before answering

    async def stop(self) -> None:
        await self.pulls.stop()
        self.queue.stop()
        await cancel_and_wait(list(self._outliving))

    def outlive_client(self, task: asyncio.Task[Any]) -> None:
        """Keep ``task`` running after the client that asked for it has gone (a create's fan-out,
        which must end alike on every agent); it is cancelled at `stop`."""
        self._outliving.add(task)
        task.add_done_callback(self._outliving.discard)

    async def send(
        self, req: WorkRequest, *, queue_timeout: float | None = None, decision: Decision | None = None
    ) -> Reply:
        """Route ``req`` to an agent and return once that agent's reply has begun (its head);
        ``decision`` is told where it went and why, and which model served it. A model call goes
        by the fleet's aliases and fallbacks (`corral.gateway.policy`)."""
        wait_s = self.settings.queue_timeout_s if queue_timeout is None else queue_timeout
        decision = decision or new_decision()
        if req.model is None:
            return await self._send(req, wait_s, decision)
        if self.policy is None or req.endpoint not in MODEL_ENDPOINTS:
            reply = await self._send(req, wait_s, decision)
            decision.served = listed_as(self.fleet.get(reply.agent), req.model)
            return reply
        return await self._send_by_policy(req, wait_s, decision)

    async def _send_by_policy(self, req: WorkRequest, wait_s: float, decision: Decision) -> Reply:
        """Try the request's model (or its alias's target); when no agent has it, a loaded model
        in another quantisation (when on); then its fallbacks. Each but the last may take
        ``fallback_after_s`` of the deadline; an error other than not found or busy is the model's
        own answer."""
        assert req.model is not None and self.policy is not None
        requested = req.model.key
        tries = candidates(self.policy.policy, requested, req.allowed)
        deadline = time.monotonic() + wait_s
        first: CorralError | None = None
        i = 0
        while i < len(tries):
            attempt = tries[i]
            i += 1
            work = req if attempt.kind is None else substitute(req, attempt.key)
            remaining = max(0.0, deadline - time.monotonic())
            budget = remaining if i == len(tries) else min(remaining, self.settings.fallback_after_s)
            try:
                reply = await self._send(work, budget, decision)
            except (ModelNotFound, NoCapacity) as e:
                first = first or e
                if i == 1 and isinstance(e, ModelNotFound) and self.settings.quant_fallback:
                    quant = quant_match(attempt.key, self.fleet.agents(), req.allowed)
                    if quant is not None and all(t.key != quant.lower() for t in tries):
                        tries.insert(1, Candidate(quant, "quant"))
                continue
            assert work.model is not None
            decision.served = listed_as(self.fleet.get(reply.agent), work.model)
            if attempt.kind is not None:
                decision.requested, decision.substitution = requested, attempt.kind
                log.info("%s served by %s (%s)", requested, decision.served, attempt.kind)
            return reply
        assert first is not None
        raise first

    async def _send(self, req: WorkRequest, wait_s: float, decision: Decision) -> Reply:
        deadline = time.monotonic() + wait_s
        failed: set[str] = set()
        strategy = req.strategy or self.settings.strategy
        decision.strategy = strategy
        waited: float | None = None  # how long it waited for the fleet to change, when it did
        auto = req.model is not None and strategy == "auto"
        session_agent = None
        if auto and req.session and req.follow_up and self.sessions is not None:
            session_agent = await self.sessions.lookup(req.session)
        decision.failure, decision.direct_only = None, False  # per model tried (aliases, fallbacks)
        bench = req.model is not None  # leave out agents whose breaker is open, while others may serve it
        pulled = False
        held: Reply | None = None  # an agent's 5xx, kept while others are tried (`_try_elsewhere`)
        try:
            while True:
                t = self.transport
                if (cut_off := self.outage.seen(t.nc.is_connected, time.monotonic(), t.epoch())) is not None:
                    raise NoCapacity(cut_off)
                skip = self._unanswering()
                key = req.model.key if bench and req.model is not None else ""
                benched = set(self.breakers.tripped(key, time.monotonic())) if key else set()
                if benched and not self._left_to_try(req, failed | skip | benched):
                    bench, benched = False, set()  # only they may serve it: the fault may have passed
                decision.direct_only |= bool(benched)  # they would take shared subjects and the queue
                avoid = failed | skip | benched if skip or benched else failed  # what this pass does not try
                try:
                    reply = await self._send_once(req, deadline, avoid, strategy, session_agent, decision)
                except ModelNotFound:
                    if pulled or not self.settings.auto_pull or req.model is None:
                        raise
                    pulled = True
                    if not await self.pulls.pull(req):
                        raise
                    deadline = time.monotonic() + wait_s  # the wait for capacity starts now
                    continue
                finally:
                    if skip or benched:
                        failed |= avoid - skip - benched  # what this pass found failing
                if reply is not None and held is None and self._try_elsewhere(req, reply, failed | skip):
                    failed.add(reply.agent)  # once: a 5xx may be the request's own doing
                    decision.direct_only, held = True, reply
                    continue
                if reply is not None:
                    if req.model is not None:
                        self.breakers.answered(reply.agent, req.model.key)
                    if waited is not None:  # besides any wait in the fleet queue (`FleetQueue.wait`)
                        decision.queue_s = (decision.queue_s or 0.0) + waited
                    if failed:
                        self.metrics.failed_over(req)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("%s", explain(req, reply.agent, decision, self.fleet, t.outstanding))
                    return reply
                if held is not None and not self._left_to_try(req, failed | skip):
                    reply, held = held, None
                    return reply  # Ollama's own error, from the last agent that gave one
                if decision.failure is not None and not self._left_to_try(req, failed | skip):
                    raise decision.failure  # as one Ollama would have answered, not a wait for the deadline
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoCapacity()
                since = time.monotonic()
                await self.fleet.wait_changed(min(remaining, 1.0))
                waited = (waited or 0.0) + time.monotonic() - since
        finally:
            if held is not None:
                await held.close()

    def _try_elsewhere(self, req: WorkRequest, reply: Reply, failed: set[str]) -> bool:
        """Whether a model call's reply is a server error (Ollama's 5xx: its runner crashed, the
        model does not fit its memory, its own queue is full) that another agent may not give:
        nothing has reached the client yet, so it is tried there, and given only if none is left."""
        other = reply.status >= 500 and req.endpoint in MODEL_ENDPOINTS
        if not (other and self._left_to_try(req, failed | {reply.agent})):
            return False  # (one other agent is tried: `_send` holds one 5xx at most)
        log.warning(
            "agent %s answered %d before any byte went out; trying elsewhere", reply.agent, reply.status
        )
        self.metrics.retried(req, "failed")
        return True

    def _unanswering(self) -> set[str]:
        """Agents that let a request sent to them go unanswered (stopped, wedged or cut off from
        NATS) and whose state has not been heard since: no request is sent to them until it is,
        so one stopped agent costs one claim timeout, not one per request. A registry removes one
        that stays silent."""
        return self.transport.unanswering(self.fleet.heard)

    async def _attempt(
        self,
        req: WorkRequest,
        subject: str,
        agent: str | None,
        deadline: float,
        failed: set[str],
        decision: Decision,
        *,
        now: bool = False,
    ) -> Reply | Outcome:
        """One attempt, its retry counted when it did not begin a reply and others may be tried. An
        agent that claimed it and failed it before its head joins ``failed``, its error noted as
        ``decision.failure``: the request's answer if no agent is left to try."""
        outcome = await self.transport.attempt(req, subject, agent, deadline, now=now)
        if isinstance(outcome, Failure):
            self._failed_on(req, outcome, failed, decision)
            outcome = Outcome.FAILED
        if outcome is Outcome.BUSY or outcome is Outcome.FAILED:
            self.metrics.retried(req, outcome.name.lower())
        return outcome

    def _failed_on(self, req: WorkRequest, failure: Failure, failed: set[str], decision: Decision) -> None:
        """An agent claimed ``req`` and failed it before its head: never again for this request,
        and for a while not for its model's next ones either (`Breakers`)."""
        failed.add(failure.agent)
        decision.failure, decision.direct_only = failure.error, True
        if req.model is not None:
            self.breakers.failed(failure.agent, req.model.key, failure.error, time.monotonic())

    async def send_to(self, agent_id: str, req: WorkRequest, *, timeout: float | None = None) -> Reply:
        """Send to one agent's direct subject; no fallback (fan-out of unloads, pinned agents)."""
        wait_s = self.settings.queue_timeout_s if timeout is None else timeout
        return await self.transport.send_to(agent_id, req, timeout=wait_s)

    async def _send_once(
        self,
        req: WorkRequest,
        deadline: float,
        failed: set[str],
        strategy: str,
        session_agent: str | None,
        decision: Decision,
    ) -> Reply | None:
        """One pass over the fleet under ``strategy``; None when nothing could take it now."""
        if req.model is not None and strategy == "auto":
            reply = await self._send_auto(req, deadline, failed, session_agent, decision)
            if reply is not None and reply.status < 500 and req.session and self.sessions is not None:
                self.sessions.remember(req.session, reply.agent)  # not one that failed it
            return reply
        decision.route = strategy
        for subject, agent in self._plan(req, failed, strategy):
            outcome = await self._attempt(req, subject, agent, deadline, failed, decision)
            if isinstance(outcome, Reply):
                return outcome
            if outcome is Outcome.FAILED and agent is not None:
                failed.add(agent)
        return None

    def _plan(self, req: WorkRequest, failed: set[str], strategy: str) -> Iterator[tuple[str, str | None]]:
        subjects = self.transport.subjects
        if req.model is None:  # not a model request: any live agent will do
            for a in sorted(self.fleet.agents(), key=lambda a: load(a, self.transport.outstanding)):
                if a.status == "active" and a.id not in failed:
                    yield subjects.agent_work(a.id), a.id
            return
        usable = self._usable(req, failed)
        route = Route(key=req.model.key, vendor=req.vendor, strict=req.strict, num_ctx=self._num_ctx(req))
        for a in self.router.rank(strategy, route, usable, self.transport.outstanding):
            yield subjects.agent_work(a.id), a.id

    def _left_to_try(self, req: WorkRequest, failed: set[str]) -> bool:
        """Whether an agent the request has not failed on may still serve it."""
        if req.model is None:
            return any(a.status == "active" and a.id not in failed for a in self.fleet.agents())
        try:
            return bool(self._usable(req, failed))
        except CorralError:  # no holder left at all
            return False

    def _usable(self, req: WorkRequest, failed: set[str]) -> list[AgentState]:
        """Active holders of the request's model not yet failed; ModelNotFound when none hold it.
        None usable when its only holders went silent lately (`FleetView.lately_silent_with`): the
        request waits for them to speak again, or to be gone."""
        assert req.model is not None
        key = req.model.key

        def pinned(agents: list[AgentState]) -> list[AgentState]:
            return [a for a in agents if a.vendor == req.vendor] if req.vendor and req.strict else agents

        everywhere = self.fleet.with_model(key)
        holders = pinned(everywhere)
        if not holders:
            if pinned(self.fleet.lately_silent_with(key)):
                return []
            if down := pinned([a for a in self.fleet.agents() if a.ollama_down and self.fleet.alive(a)]):
                # its Ollama may hold the model: a 404 would have clients pull it (the ollama CLI does)
                raise BackendError(
                    f"model '{req.model.display}' is on no agent whose Ollama answers; the Ollama of "
                    f"{len(down)} agent(s) cannot be read now ({', '.join(sorted(a.id for a in down))})"
                )
            raise ModelNotFound(req.model.display, vendor=req.vendor if everywhere else None)
        return [a for a in holders if a.status == "active" and a.id not in failed]

    def _num_ctx(self, req: WorkRequest) -> int | None:
        """The request's ``num_ctx`` capped at its model's trained context, where an agent knows it:
        the context Ollama runs it at, so the runner (and load) it is routed and marked at. The
        body itself goes unchanged (Ollama caps it the same way)."""
        assert req.model is not None
        if req.num_ctx is None:  # the common case: no fleet scan
            return None
        return route_ctx(req.model.key, req.num_ctx, self.fleet.with_model(req.model.key))

    # -- auto --------------------------------------------------------------------------------------
    async def _send_auto(
        self,
        req: WorkRequest,
        deadline: float,
        failed: set[str],
        session_agent: str | None,
        decision: Decision,
    ) -> Reply | None:
        """One pass of the auto plan (module docstring); None when the caller should wait and retry."""
        assert req.model is not None
        transport, router, loads = self.transport, self.router, self.loads
        model = req.model
        tried: set[str] = set()

        full: set[str] = set()  # agents that answered a send marked now that no slot is free

        async def direct(a: AgentState, why: str, *, now: bool = False) -> Reply | None:
            tried.add(a.id)
            decision.route = why
            outcome = await self._attempt(
                req, transport.subjects.agent_work(a.id), a.id, deadline, failed, decision, now=now
            )
            if isinstance(outcome, Reply):
                return outcome
            if outcome is Outcome.FAILED:
                failed.add(a.id)
            elif outcome is Outcome.BUSY and now:
                full.add(a.id)
            return None

        num_ctx = self._num_ctx(req)

        def route_for(usable: list[AgentState]) -> Route:
            session = session_agent if any(a.id == session_agent for a in usable) else None
            return Route(
                key=model.key,
                vendor=req.vendor,
                strict=req.strict,
                num_ctx=num_ctx,
                session_agent=session,
            )

        batch = req.priority == BATCH  # only spare slots: no direct sends to a busy agent
        unclaimed = False  # a warm claim was taken and never claimed
        # 1. the conversation's agent, while the cost model still puts it first (its prompt cache)
        if session_agent is not None and not batch:
            usable = self._usable(req, failed)
            ranked = router.rank("auto", route_for(usable), usable, transport.outstanding)
            if ranked and ranked[0].id == session_agent:
                if (reply := await direct(ranked[0], SESSION)) is not None:
                    return reply
        # 2. warm claims: an agent with a free slot on a default-context runner takes it now. The
        # fast path: no ranking, no fleet scan — NATS knows who has a free slot. Not once an agent
        # failed it or a breaker leaves one out: a shared subject cannot (it frees its slot at once)
        if req.num_ctx is None and not decision.direct_only:
            token, lane = model.token, req.priority
            subjects = [transport.subjects.work(req.vendor, token, lane)] if req.vendor else []
            if not (req.vendor and req.strict):
                subjects.append(transport.subjects.work(ANY_VENDOR, token, lane))
            decision.route = WARM
            for subject in subjects:
                outcome = await self._attempt(req, subject, None, deadline, failed, decision)
                if isinstance(outcome, Reply):
                    return outcome
                # taken and never claimed (an agent failing it claimed it first: it answers)
                unclaimed = unclaimed or (outcome is Outcome.FAILED and decision.failure is None)
                if decision.direct_only:
                    break
        usable = self._usable(req, failed)
        route = route_for(usable)
        ranked = router.rank("auto", route, usable, transport.outstanding)
        # 3. whoever can start it now by the fleet state (claims lag a little behind it). Not after
        # a claim went unanswered: an agent took it and went silent (stopped, cut off), and the fleet
        # state still shows its free slots; the queue below is served only by agents that answer
        for a in () if batch or unclaimed else ranked:
            if (
                a.id not in tried
                and a.id not in failed
                and warm(route, a)
                and load(a, transport.outstanding) < 1
            ):
                if (reply := await direct(a, WARM, now=True)) is not None:
                    return reply
        # 4. nothing can start it now: a load, or a wait (ranked again: the attempts above moved
        # the outstanding counts the costs are made of, and agents that said they are full are)
        outstanding = slots_taken(usable, transport.outstanding, full) if full else transport.outstanding
        live = router.rank(
            "auto",
            route,
            loads.as_placed([a for a in usable if a.id not in failed]),  # with the loads it just sent
            self.queue.with_queue(route, usable, req.priority, outstanding),
        )
        if not live:
            return None
        top = live[0]
        if not warm(route, top) and not loads.under_way(route, live):  # `top` is among `live`
            target, mine = await loads.place(req, route, top, failed)
            if target is not None and mine:
                reply = await direct(target, LOAD)
                if reply is None or reply.status >= 400:
                    # the load failed (Ollama's error, e.g. not enough memory) or never started: the
                    # next request must not wait on it as if it were under way
                    await loads.unplace(req, route, target, failed=reply is not None)
                return reply
        # the fleet queue, unless an agent is to be left out: any agent serves the queue, that one too
        if req.num_ctx is None and self.settings.queue and not decision.direct_only:
            decision.route = QUEUED
            on_failure = partial(self._failed_on, req, failed=failed, decision=decision)
            return await self.queue.wait(req, route, deadline, failed, decision, on_failure)  # sets queue_s
        if batch and decision.direct_only:
            return None  # no agent's own FIFO (no lanes there): it waits for the fleet to change
        for a in live:  # its own num_ctx: wait at the agent whose runner will match soonest
            if warm(route, a) or loads.loading_at(route, a):
                return await direct(a, QUEUED)
        return None
