"""The agent: one per Ollama. Capacity is expressed as interest.

For every model its Ollama has loaded, the agent holds one single-shot queue subscription per free
slot on ``work.any.{model}`` and ``work.{vendor}.{model}``: NATS gives each request to exactly one
agent that can start it now, in proportion to free slots, and answers "no responders" when none
can. A subscription is armed with ``UNSUB <sid> 1`` so the server retires it after one delivery;
nothing needs to race to take interest back. Direct work (``agent.{id}.work``) is always claimed
while the agent is active: if no slot is free it waits in a bounded local FIFO that is served
before the agent takes interest again, and past that bound the agent answers ``busy``.

Lifecycle: NEW → RUNNING → DRAINING → STOPPED. `stop` drops every claim subscription, lets
in-flight work finish within the grace period, cancels the rest with a final error, deletes the
agent's KV entry and drains the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
from collections import deque
from collections.abc import Callable

import msgspec
from corral.agent.ollama import OllamaClient
from corral.agent.settings import AgentSettings
from corral.agent.worker import Job, Worker, reply_counts
from corral.client.routing import effective_ctx, key_of
from corral.protocol import headers as H
from corral.protocol.endpoints import MODEL_ENDPOINTS
from corral.protocol.errors import Cancelled
from corral.protocol.messages import (
    AgentState,
    Gpu,
    PsModel,
    RequestFinished,
    TagModel,
    agent_state_encoder,
)
from corral.protocol.names import ANY_VENDOR, VENDORS, decode_token, encode_token, parse_name
from corral.protocol.subjects import Subjects
from corral.runtime.nats import Buckets, connect, ensure_buckets
from corral.runtime.tasks import cancel_and_wait
from corral.runtime.telemetry import tracer
from corral.runtime.workqueue import Puller
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)

_event_encoder = msgspec.json.Encoder()
_GIB = 1 << 30

# endpoints after which the models on disk differ: the agent re-reads its Ollama at once
_CHANGES_MODELS = frozenset({"/api/pull", "/api/delete", "/api/copy", "/api/create"})


class Lifecycle(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


def default_agent_id(ollama_url: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(ollama_url)
    raw = f"{socket.gethostname()}-{u.port or 11434}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw).lower()


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        gpus: list[Gpu] | None = None,
        probe: Callable[[], list[Gpu]] | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """``probe`` re-reads the GPUs on every refresh (NVML, sysfs); ``gpus`` are fixed ones."""
        self.settings = settings
        self._probe = probe
        self.id = settings.id or default_agent_id(settings.ollama_url)
        self.vendor = settings.vendor or "cpu"
        if self.vendor not in VENDORS:
            raise ValueError(f"vendor must be one of {', '.join(VENDORS)}")
        self.subjects = Subjects(settings.root)
        self.ollama = OllamaClient(settings.ollama_url)
        self.lifecycle = Lifecycle.NEW
        self.status: str = "active"
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._closing = asyncio.Event()
        self._done = asyncio.Event()
        self._gpus = tuple(gpus or ())
        self.nc: NATS | None = None
        self._buckets: Buckets | None = None
        self._worker: Worker | None = None
        self._tracer = tracer(__name__, tracer_provider)
        self._tg: asyncio.TaskGroup | None = None
        self._subs: list[Subscription] = []
        self._claims: dict[str, list[Subscription]] = {}  # claim subject → armed single-shot subs
        self._busy: dict[str, int] = {}  # model token → requests holding a slot
        self._waiting: dict[str, deque[Job]] = {}  # model token → FIFO of jobs waiting for a slot
        self._jobs: dict[str, Job] = {}
        self._models: tuple[TagModel, ...] = ()
        self._loaded: tuple[PsModel, ...] = ()
        # models Ollama has finished loading: in /api/ps with none of our requests waiting on a
        # load, or answered a request since (Ollama lists a runner in /api/ps while it loads)
        self._ready: set[str] = set()
        # token → {request id: (its num_ctx or 0, the context it needs)} of the requests waiting on
        # a load (or reload) of that model, oldest first: the first one's context is loading now
        self._load_waiters: dict[str, dict[str, tuple[int, int]]] = {}
        self._ready_news = False  # a model became ready since the last refresh
        self._warm_tokens: frozenset[str] = frozenset()  # loaded at the default num_ctx: claimable
        self._trained: dict[str, int] = {}  # loaded model key → trained context
        self._ran_default: set[str] = set()  # tokens just served without num_ctx (not yet warm)
        self._learned_ctx: dict[str, int] = {}  # model key → runner context seen for such requests
        self._trained_by_digest: dict[str, int] = {}
        self._version = ""
        self._started_at = time.time()
        self._claims_dirty = asyncio.Event()
        self._puller: Puller | None = None
        self._nudges: dict[str, Subscription] = {}  # queued-nudge subject → subscription
        self._queue_hint: dict[str, int] = {}  # warm model token → nudges seen (0 = queue known empty)
        self._state_dirty = asyncio.Event()
        self._refresh_now = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until `stop`; the whole life of the agent, background work in one TaskGroup."""
        if self.lifecycle is not Lifecycle.NEW:
            raise RuntimeError("an agent runs once")
        self.lifecycle = Lifecycle.RUNNING
        try:
            await self._open()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                loops = [
                    tg.create_task(self._reconcile_loop(), name="claims"),
                    tg.create_task(self._state_loop(), name="state"),
                    tg.create_task(self._refresh_loop(), name="refresh"),
                    tg.create_task(self._ping_loop(), name="ping"),
                ]
                self.ready.set()
                log.info("agent %s (%s) serving %s", self.id, self.vendor, self.settings.ollama_url)
                await self._stop.wait()
                await self._drain()
                self._closing.set()
                await cancel_and_wait(loops)  # they park on events; nothing is left for them to do
        finally:
            await self._close()
            self.lifecycle = Lifecycle.STOPPED
            self._done.set()

    async def stop(self) -> None:
        """Drain and stop; idempotent and safe before start."""
        if self.lifecycle is Lifecycle.NEW:
            self.lifecycle = Lifecycle.STOPPED
            self._done.set()
            return
        self._stop.set()
        await self._done.wait()

    async def _open(self) -> None:
        self.nc = await connect(self.settings.nats_url, name=f"corral-agent-{self.id}")
        self._buckets = await ensure_buckets(self.nc.jetstream(), self.subjects)
        self._worker = Worker(
            self.nc,
            self.ollama,
            self.id,
            templates=(self.subjects.agent_work_template, self.subjects.work_template),
            tracer=self._tracer,
        )
        self._worker.on_response = self._on_response
        self._worker.on_answered = self._on_answered
        self._puller = Puller(self.nc, self.subjects)
        await self.ollama.start()
        await self._refresh()
        self._subs.append(await self.nc.subscribe(self.subjects.agent_work(self.id), cb=self._on_direct))
        self._subs.append(await self.nc.subscribe(self.subjects.agent_ctl(self.id), cb=self._on_ctl))
        await self._publish_state()

    async def _drain(self) -> None:
        self.lifecycle = Lifecycle.DRAINING
        self.status = "draining"
        await self._drop_claims()
        await self._publish_state()
        for job in [j for q in self._waiting.values() for j in q]:
            self._cancel_job(job)
        running = [j.task for j in self._jobs.values() if j.task is not None]
        if running:
            log.info(
                "draining: waiting up to %.0fs for %d requests", self.settings.drain_grace_s, len(running)
            )
            _, pending = await asyncio.wait(running, timeout=self.settings.drain_grace_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            if self._buckets is not None:
                with contextlib.suppress(Exception):
                    await self._buckets.agents.delete(self.id)
            with contextlib.suppress(Exception):
                await self.nc.drain()
        await self.ollama.close()

    # -- work intake -------------------------------------------------------------------------
    def _job_from(self, msg: Msg) -> Job | None:
        h = msg.headers or {}
        rid = h.get(H.REQUEST)
        reply = h.get(H.REPLY) or msg.reply  # a queued request names its reply subject in a header
        if not rid or not reply:
            log.warning("dropping work without request id or reply subject on %s", msg.subject)
            return None
        size = h.get(H.BODY_SIZE)
        gw_rid = reply.rsplit(".", 2)
        return Job(
            rid=rid,
            reply=reply,
            subject=msg.subject,
            endpoint=h.get(H.ENDPOINT, "/"),
            method=h.get(H.METHOD, "POST"),
            token=h.get(H.MODEL),
            body=msg.data,
            body_size=int(size) if size else None,
            body_subject=self.subjects.body(gw_rid[-2], gw_rid[-1]) if size else "",
            deadline_ms=int(h.get(H.DEADLINE, "0")),
            echo_model=h.get(H.ECHO_MODEL),
            upstream_model=h.get(H.UPSTREAM_MODEL),
            num_ctx=int(h.get(H.NUM_CTX) or 0),
            unload=H.UNLOAD in h,
            trace={k: h[k] for k in (H.TRACEPARENT, H.TRACESTATE) if k in h},
        )

    def _on_response(self, job: Job, status: int) -> None:
        token = job.token
        if token is None or status >= 400:
            return
        waiters = self._load_waiters.get(token)
        if waiters is not None:
            mine = waiters.pop(job.rid, None)
            if mine is None:
                return  # answered on the runner before the load this model waits on
            # the runner now has this request's context: those waiting for the same context run on
            # it; any waiting for another context wait on a reload after it
            waiters = {rid: w for rid, w in waiters.items() if w[1] != mine[1]}
            self._state_dirty.set()
            if waiters:
                self._load_waiters[token] = waiters
                return
            del self._load_waiters[token]
        if token not in self._ready:
            self._ready.add(token)  # Ollama answers only once the model is loaded
            # published by the refresh this triggers, together with Ollama's /api/ps: a state that
            # says "not loading" must also list the runner, or the model looks absent meanwhile
            self._ready_news = True
            self._refresh_now.set()  # advertise it and take interest at once

    def _note_load(self, job: Job) -> None:
        """Before ``job`` reaches Ollama: will it load its model, or reload the runner at another
        context? Then the model is loading — for that context — until Ollama answers."""
        token = job.token
        if token is None or job.unload or job.endpoint not in MODEL_ENDPOINTS:
            return
        if not job.num_ctx and token in self._warm_tokens and token not in self._load_waiters:
            return  # the common case: a default request on a warm default runner
        key = decode_token(token)
        want = self._wanted_ctx(key, job.num_ctx)
        waiters = self._load_waiters.get(token)
        if waiters is None and token in self._ready:
            runner = next((m for m in self._loaded if _token_of(m.name) == token), None)
            if runner is not None and runner.context_length in (0, want):
                return  # a runner that serves it is loaded
            # a runner at another context (a reload), or none since the last /api/ps (a load)
            self._ready.discard(token)
            if token in self._warm_tokens:
                self._warm_tokens = self._warm_tokens - {token}
                self._claims_dirty.set()
        self._load_waiters.setdefault(token, {})[job.rid] = (job.num_ctx, want)
        self._state_dirty.set()

    def _forget_waiter(self, job: Job) -> None:
        """``job`` ended without an answer: it waits on no load any more."""
        if job.token is None:
            return
        waiters = self._load_waiters.get(job.token)
        if waiters is not None and waiters.pop(job.rid, None) is not None and not waiters:
            del self._load_waiters[job.token]
            self._state_dirty.set()

    def _wanted_ctx(self, key: str, num_ctx: int, trained: int | None = None) -> int:
        """The context Ollama gives ``key``'s runner for a request asking ``num_ctx`` (0: the default
        — as observed, else as assumed from configuration and VRAM), capped at the trained context
        (``trained``, else the last one read)."""
        if trained is None:
            trained = self._trained.get(key, 0)
        if num_ctx:
            return effective_ctx(num_ctx, trained)
        return self._learned_ctx.get(key) or effective_ctx(self.default_num_ctx(), trained)

    def _free(self, token: str) -> int:
        return self.settings.parallel - self._busy.get(token, 0) - len(self._waiting.get(token, ()))

    async def _on_claim(self, msg: Msg) -> None:
        """A delivery on an armed claim subscription (it is spent now)."""
        subs = self._claims.get(msg.subject)
        if subs is not None:
            self._claims[msg.subject] = [s for s in subs if s._id != msg.sid]
        job = self._job_from(msg)
        if job is None:
            return
        assert self._worker is not None
        if self.status != "active" or job.token is None or self._free(job.token) <= 0:
            # a sibling subscription for the same slot fired too: let the gateway go elsewhere
            await self._worker.busy(job.reply)
            self._claims_dirty.set()
            return
        await self._admit(job)

    async def _on_direct(self, msg: Msg) -> None:
        job = self._job_from(msg)
        if job is None:
            return
        assert self._worker is not None
        if self.status != "active":
            await self._worker.busy(job.reply)
            return
        if job.token is not None and self._free(job.token) <= 0:
            if sum(len(q) for q in self._waiting.values()) >= self.settings.max_queue:
                await self._worker.busy(job.reply)
                return
            job.slot = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(job.token, deque()).append(job)
        await self._admit(job)

    async def _admit(self, job: Job) -> None:
        assert self._worker is not None and self._tg is not None
        if job.slot is None and job.token is not None:
            self._busy[job.token] = self._busy.get(job.token, 0) + 1
        self._jobs[job.rid] = job
        self._worker.claim_soon(job)
        job.task = self._tg.create_task(self._execute(job), name=f"job-{job.rid}")
        self._claims_dirty.set()
        self._state_dirty.set()

    async def _execute(self, job: Job) -> None:
        assert self._worker is not None
        holds_slot = job.slot is None
        try:
            if job.slot is not None:
                await job.slot  # granted by _release, in FIFO order
                holds_slot = True
            self._note_load(job)
            status = await self._worker.run(job)
            if job.token is not None:
                await self._report(job, status)
                if status == 200 and not job.num_ctx and job.token not in self._warm_tokens:
                    self._ran_default.add(job.token)  # its runner shows Ollama's real default
                    self._refresh_now.set()
            if (job.unload or job.endpoint in _CHANGES_MODELS) and 200 <= status < 300:
                self._refresh_now.set()  # what is on disk or loaded changed: advertise it now
        except asyncio.CancelledError:
            if not holds_slot:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._worker.fail(job, Cancelled("request canceled")))
            # the job ends here; the TaskGroup must not see this cancellation as its own
        finally:
            if job.claim_timer is not None:
                job.claim_timer.cancel()
            self._jobs.pop(job.rid, None)
            self._forget_waiter(job)
            if job.token is not None:
                if holds_slot:
                    if not job.released:  # else freed already, when Ollama's answer ended
                        self._release(job.token)
                else:
                    q = self._waiting.get(job.token)
                    if q is not None and job in q:
                        q.remove(job)
            self._claims_dirty.set()
            self._state_dirty.set()

    async def _report(self, job: Job, status: int) -> None:
        """One ``events.request`` per finished model request: what the aggregator's rates are made of."""
        assert self.nc is not None and job.token is not None
        generated, prompt = reply_counts(job.last_bytes) if status == 200 else (0, 0)
        event = RequestFinished(
            agent=self.id,
            model=decode_token(job.token),
            endpoint=job.endpoint,
            status=status,
            ttft_ms=None if job.ttft_ms is None else round(job.ttft_ms, 3),
            duration_ms=round((time.monotonic() - job.ran_from) * 1000, 3),
            eval_count=generated,
            prompt_eval_count=prompt,
        )
        with contextlib.suppress(Exception):
            await self.nc.publish(self.subjects.event("request"), _event_encoder.encode(event))

    async def _on_answered(self, job: Job) -> None:
        """Ollama has finished ``job``: free its slot and arm that slot's claim now.

        This runs before the reply's last message is published, so the new subscription reaches
        NATS first. A client answered at once may send its next request at once; it finds the slot
        armed instead of falling back to a direct send or the queue. Requests waiting here or in
        the fleet queue keep their turn: the slot passes to them and nothing is armed.
        """
        token = job.token
        if token is None or job.released:
            return
        job.released = True
        self._release(token)
        if self.status != "active" or token not in self._warm_tokens or self._queue_hint.get(token):
            return
        free = max(self._free(token), 0)
        for subject in self._claim_subjects(token):
            await self._arm(subject, free)

    def _release(self, token: str) -> None:
        q = self._waiting.get(token)
        while q:
            nxt = q.popleft()
            if nxt.slot is not None and not nxt.slot.done():
                nxt.slot.set_result(None)  # the slot passes straight to the next in line
                return
        self._busy[token] = self._busy.get(token, 1) - 1
        if self._busy[token] <= 0:
            del self._busy[token]

    def _cancel_job(self, job: Job) -> None:
        if job.task is not None and not job.task.done():
            job.task.cancel()

    async def _on_ctl(self, msg: Msg) -> None:
        h = msg.headers or {}
        kind = h.get(H.CTL)
        if kind == H.CANCEL:
            job = self._jobs.get(h.get(H.REQUEST, ""))
            if job is not None:
                log.info("cancelling request %s at the gateway's request", job.rid)
                self._cancel_job(job)
        elif kind in (H.DRAIN, H.CORDON):
            self.status = "draining" if kind == H.DRAIN else "cordoned"
            self._claims_dirty.set()
            self._state_dirty.set()
        elif kind == H.UNCORDON:
            self.status = "active"
            self._claims_dirty.set()
            self._state_dirty.set()
        if msg.reply:
            await msg.respond(b"")

    # -- claim subscriptions -----------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        while not self._closing.is_set():
            await self._claims_dirty.wait()
            self._claims_dirty.clear()
            if self.lifecycle is not Lifecycle.RUNNING:
                continue
            await self._reconcile()

    async def _reconcile(self) -> None:
        assert self.nc is not None
        want: dict[str, int] = {}
        await self._sync_nudges()
        if self.status == "active":
            for token in self._warm_tokens:
                await self._take_queued(token)  # waiting requests first, then new work
                free = max(self._free(token), 0)
                want.update(dict.fromkeys(self._claim_subjects(token), free))
        for subject in set(self._claims) | set(want):
            subs = self._claims.setdefault(subject, [])
            n = want.get(subject, 0)
            # Surplus armed subscriptions of a warm model are left armed: taking interest back
            # races with a delivery already on its way (dropped on unsubscribe, the request then
            # waits out the claim timeout). A surplus delivery is answered `busy` instead and the
            # gateway moves on at once; each subscription fires only once anyway.
            while len(subs) > n and subject not in want:
                with contextlib.suppress(Exception):
                    await subs.pop().unsubscribe()
            await self._arm(subject, n)
            if not subs:
                del self._claims[subject]

    def _claim_subjects(self, token: str) -> tuple[str, str]:
        """Where requests for ``token`` are claimed here: unpinned, and pinned to this vendor."""
        return self.subjects.work(ANY_VENDOR, token), self.subjects.work(self.vendor, token)

    async def _arm(self, subject: str, n: int) -> None:
        """Arm single-shot claim subscriptions on ``subject`` until ``n`` are armed."""
        assert self.nc is not None
        if n <= len(self._claims.get(subject, ())):
            return
        subs = self._claims.setdefault(subject, [])
        while len(subs) < n:
            sub = await self.nc.subscribe(subject, queue=subject, cb=self._on_claim)
            await sub.unsubscribe(limit=1)
            subs.append(sub)

    # -- the overflow queue ----------------------------------------------------------------------
    async def _sync_nudges(self) -> None:
        """Listen for enqueue nudges of exactly the warm models (while active)."""
        assert self.nc is not None
        want = set()
        if self.status == "active":
            for token in self._warm_tokens:
                want.add(self.subjects.queued(ANY_VENDOR, token))
                want.add(self.subjects.queued(self.vendor, token))
        for subject in set(self._nudges) - want:
            with contextlib.suppress(Exception):
                await self._nudges.pop(subject).unsubscribe()
        for subject in want - set(self._nudges):
            self._nudges[subject] = await self.nc.subscribe(subject, cb=self._on_nudge)
        for token in list(self._queue_hint):
            if token not in self._warm_tokens:
                del self._queue_hint[token]
        for token in self._warm_tokens:
            self._queue_hint.setdefault(token, 1)  # newly warm: requests may be waiting already

    async def _on_nudge(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        if token in self._warm_tokens:
            self._queue_hint[token] = self._queue_hint.get(token, 0) + 1
            self._claims_dirty.set()

    async def _take_queued(self, token: str) -> None:
        """Admit up to the free slots' worth of queued requests for ``token``, oldest first."""
        assert self._puller is not None
        hint = self._queue_hint.get(token, 0)
        if not hint:
            return
        got_all = True
        for vendor in (self.vendor, ANY_VENDOR):
            free = self._free(token)
            if free <= 0:
                return  # more may wait: the hint stays for the next free slot
            msgs, drained = await self._puller.take_batch(self.subjects.queue(vendor, token), free)
            got_all = got_all and drained
            for msg in msgs:
                job = self._job_from(msg)
                if job is not None:
                    await self._admit(job)
        if got_all and self._queue_hint.get(token) == hint:
            self._queue_hint[token] = 0  # both queues ran dry and no nudge came meanwhile

    async def _drop_claims(self) -> None:
        for sub in self._nudges.values():
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._nudges.clear()
        for subs in self._claims.values():
            for s in subs:
                with contextlib.suppress(Exception):
                    await s.unsubscribe()
        self._claims.clear()

    # -- backend state -----------------------------------------------------------------------
    async def _refresh(self) -> None:
        try:
            if not self._version:
                self._version = await self.ollama.version()
            models, loaded = await self.ollama.tags(), await self.ollama.ps()
        except Exception as e:  # unreachable or odd backend: advertise nothing until it is back
            log.warning("cannot read ollama at %s: %s", self.settings.ollama_url, e)
            self._version = ""
            models, loaded = [], []
        if self._probe is not None:
            try:
                self._gpus = tuple(await asyncio.to_thread(self._probe))
            except Exception as e:
                log.warning("GPU probe failed, keeping the last reading: %s", e)
        gpus = _with_ollama_usage(self._gpus, loaded)
        if gpus != self._gpus:
            self._gpus = gpus
            self._state_dirty.set()
        tokens, warm = set(), set()
        default_ctx = self.default_num_ctx()
        trained: dict[str, int] = {}
        for m in loaded:
            with contextlib.suppress(Exception):
                name = parse_name(m.name)
                tokens.add(name.token)
                trained[name.key] = await self._trained_context(m)
                assumed = effective_ctx(default_ctx, trained[name.key])
                if name.token in self._ran_default and m.context_length:
                    self._learn_default(name.key, m.context_length, assumed)
                # a request without num_ctx runs at the default; any other runner would reload
                if m.context_length in (0, self._wanted_ctx(name.key, 0, trained[name.key])):
                    warm.add(name.token)
        self._ran_default.clear()
        if trained != self._trained:
            self._trained = trained
            self._state_dirty.set()
        # a listed model none of our requests waits on is loaded; one a request of ours waits on
        # stays loading until Ollama answers (`_on_response`); an unlisted idle one is gone
        ready = {t for t in self._ready if t in tokens or self._busy.get(t)}
        ready |= {t for t in tokens if not self._busy.get(t)}
        warm &= ready
        changed = (tuple(models), tuple(loaded)) != (self._models, self._loaded)
        self._models, self._loaded = tuple(models), tuple(loaded)
        if ready != self._ready or self._ready_news:
            self._ready, self._ready_news = ready, False
            self._state_dirty.set()
        if warm != self._warm_tokens:
            self._warm_tokens = frozenset(warm)
            self._claims_dirty.set()
        if changed:
            self._state_dirty.set()

    async def _refresh_loop(self) -> None:
        while not self._closing.is_set():
            await _wait(self._refresh_now, self.settings.refresh_s)
            self._refresh_now.clear()
            await self._refresh()

    def _learn_default(self, key: str, seen: int, assumed: int) -> None:
        """A request without num_ctx ran on a runner of ``seen`` context: that is this backend's
        default for ``key``, whatever the configuration made us assume."""
        if self._learned_ctx.get(key) == seen:
            return
        if seen != assumed:
            log.warning(
                "%s: requests without num_ctx run at context %d here, not the %d assumed; using what "
                "Ollama does (set CORRAL_CONTEXT_LENGTH to that Ollama's OLLAMA_CONTEXT_LENGTH)",
                key,
                seen,
                assumed,
            )
        self._learned_ctx[key] = seen
        self._state_dirty.set()

    async def _trained_context(self, m: PsModel) -> int:
        """Asked of Ollama once per model digest (it caps every runner's num_ctx at this)."""
        if m.digest not in self._trained_by_digest:
            try:
                self._trained_by_digest[m.digest] = await self.ollama.trained_context(m.name)
            except Exception as e:
                log.warning("cannot read %s's trained context: %s", m.name, e)
                return 0
        return self._trained_by_digest[m.digest]

    def default_num_ctx(self) -> int:
        """The backend's num_ctx for requests that give none (reference §4.1): OLLAMA_CONTEXT_LENGTH
        when configured, else Ollama's VRAM tier — ≥ 47 GiB of VRAM → 262144, ≥ 23 GiB → 32768,
        else 4096. (Ollama before 0.15.5 used a flat 4096: configure ``context_length`` for it.)"""
        if self.settings.context_length > 0:
            return self.settings.context_length
        total = 0 if self.vendor == "cpu" else sum(g.vram_total for g in self._gpus)
        return 262144 if total >= 47 * _GIB else 32768 if total >= 23 * _GIB else 4096

    def state(self) -> AgentState:
        return AgentState(
            id=self.id,
            vendor=self.vendor,
            host=self.settings.advertise_host or socket.gethostname(),
            ollama_url=self.settings.ollama_url,
            ollama_version=self._version,
            status=self.status,  # type: ignore[arg-type]
            gpus=self._gpus,
            models=self._models,
            loaded=self._loaded,
            loading=tuple(decode_token(t) for t in self._busy if t not in self._ready),
            loading_ctx={
                decode_token(t): next(iter(w.values()))[0]  # the oldest waiter's load runs first
                for t, w in self._load_waiters.items()
                if w and t not in self._ready
            },
            parallel=self.settings.parallel,
            default_num_ctx=self.default_num_ctx(),
            default_ctx=dict(self._learned_ctx),
            trained_ctx=self._trained,
            in_flight=sum(self._busy.values()),
            queued=sum(len(q) for q in self._waiting.values()),
            max_queue=self.settings.max_queue,
            started_at=self._started_at,
            updated_at=time.time(),
            heartbeat_s=self.settings.heartbeat_s,
        )

    async def _publish_state(self) -> None:
        assert self._buckets is not None
        try:
            await self._buckets.agents.put(self.id, agent_state_encoder.encode(self.state()))
        except Exception as e:
            log.warning("cannot publish agent state: %s", e)

    async def _state_loop(self) -> None:
        """Publish on change (at most every 100 ms) and on every heartbeat."""
        while not self._closing.is_set():
            await _wait(self._state_dirty, self.settings.heartbeat_s)
            self._state_dirty.clear()
            if self.lifecycle is Lifecycle.RUNNING:
                await self._publish_state()
            await _wait(self._closing, 0.1)

    async def _ping_loop(self) -> None:
        """Keep silent requests (Ollama loading a model, or a queued job) visibly alive."""
        assert self._worker is not None
        interval = self.settings.ping_interval_s
        while not self._closing.is_set():
            await _wait(self._closing, interval / 2)
            now = time.monotonic()
            for job in list(self._jobs.values()):
                if now - job.last_sent >= interval:
                    with contextlib.suppress(Exception):
                        await self._worker.ping(job)


def decode_state(data: bytes) -> AgentState:
    return msgspec.json.decode(data, type=AgentState)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds (no task per wait, unlike wait_for)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


def _token_of(name: str) -> str | None:
    key = key_of(name)  # memoised: names repeat on every /api/ps read
    return encode_token(key) if key is not None else None


def _with_ollama_usage(gpus: tuple[Gpu, ...], loaded: list[PsModel]) -> tuple[Gpu, ...]:
    """GPUs known only from configuration have no live reading: their free VRAM is what Ollama's
    loaded models leave (their ``size_vram``, spread evenly). Probed GPUs report their own."""
    config = [g for g in gpus if g.source == "config"]
    if not config:
        return gpus
    used = sum(m.size_vram for m in loaded) // len(config)
    return tuple(
        msgspec.structs.replace(g, vram_free=max(g.vram_total - used, 0)) if g.source == "config" else g
        for g in gpus
    )
