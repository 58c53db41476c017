"""The agent: one per Ollama. Capacity is expressed as interest.

The agent is an I/O shell around pure state machines: `SlotTable` (who runs, who waits), `RunnerTracker`
(what Ollama has loaded, and which runners a request may go to now). It owns the NATS subscriptions, the
Ollama client and the published state; `Claims` holds its interest in work (a claim subscription per free
slot of each warm model, and the fleet queue).

Direct work (``agent.{id}.work``) is taken while the agent is active: with no slot free it waits in a
bounded local FIFO served before the agent takes interest again; past that bound (at once, if marked
``Corral-Now``) the agent answers ``busy``. A malformed work message is answered with a ``bad_request`` end
when it names where to answer, else logged and dropped; it never stops the agent.

Lifecycle: NEW → RUNNING → DRAINING → STOPPED. `stop` drops every claim subscription, lets in-flight work
finish within the grace period, cancels the rest with a final error, deletes the agent's KV entry and drains
the connection; a `stop` while it still waits for NATS ends it at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from corral.agent.backend import Backend
from corral.agent.claims import Claims
from corral.agent.intake import guarded, job_from
from corral.agent.lifecycle import (
    Lifecycle,
    Requesters,
    Wakeups,
    default_agent_id,
    finish_within,
    leave,
    wait_at_most,
)
from corral.agent.metrics import LoadBook
from corral.agent.ollama import OllamaClient
from corral.agent.pacing import Pace, Reading, StatePacer, parts
from corral.agent.runners import RunnerChange, RunnerTracker, evicted_by
from corral.agent.settings import AgentSettings
from corral.agent.slots import Admission, SlotTable
from corral.agent.usage import SlotTime
from corral.agent.worker import Job, Worker, load_seconds, ran_seconds, report_failed, report_finished
from corral.protocol import headers as H
from corral.protocol.endpoints import MODEL_ENDPOINTS
from corral.protocol.errors import BackendError, InternalError
from corral.protocol.messages import AgentState, Gpu, agent_state_encoder
from corral.protocol.names import VENDORS
from corral.protocol.subjects import Subjects, usable_reply
from corral.runtime.buckets import Reopener, ensure_buckets_at_start
from corral.runtime.fleet import OwnState, refuse_taken_id
from corral.runtime.nats import NatsAuth, connect
from corral.runtime.tasks import cancel_and_wait, supervise
from corral.runtime.telemetry import tracer
from corral.transport.replies import send_busy
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)


# endpoints after which the models on disk differ: the agent re-reads its Ollama at once
_CHANGES_MODELS = frozenset({"/api/pull", "/api/delete", "/api/copy", "/api/create"})
_HEARD = (Lifecycle.RUNNING, Lifecycle.DRAINING)  # the states in which the agent publishes its state
REFRESH_GAP_S = 0.2  # the least time between two readings of its Ollama


class Agent:
    # 23 attributes: identity (settings, id, vendor, subjects, ollama), lifecycle (lifecycle, status, ready,
    # wake-ups, state pacer), owned I/O (connection, own state key, reopener, subscriptions, worker, claims, backend,
    # task group, tracer), state machines and their jobs (slots, runners, jobs, loads), mapped onto I/O.
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
        self.id = settings.id or default_agent_id(settings.ollama_url)
        self.vendor = settings.vendor or "cpu"
        if self.vendor not in VENDORS:
            raise ValueError(f"vendor must be one of {', '.join(VENDORS)}")
        self.subjects = Subjects(settings.root)
        self.ollama = OllamaClient(settings.ollama_url)
        self.lifecycle = Lifecycle.NEW
        self.status: str = "active"
        self.ready = asyncio.Event()
        self._wake = Wakeups()
        self.nc: NATS | None = None
        self._own: OwnState | None = None  # its state's key, written while this process holds it
        self._reopener: Reopener | None = None  # the buckets again after a NATS restart
        self._subs: list[Subscription] = []
        self._worker: Worker | None = None
        self._claims: Claims | None = None
        self._backend = Backend(
            self.ollama,
            vendor=self.vendor,
            context_length=settings.context_length,
            gpus=tuple(gpus or ()),
            probe=probe,
            stall_s=settings.stall_s,
        )
        self._tracer = tracer(__name__, tracer_provider)
        self._tg: asyncio.TaskGroup | None = None
        self.slots: SlotTable[Job] = SlotTable(settings.parallel, settings.max_queue)
        self.runners = RunnerTracker(self._backend.default_num_ctx(), on_gpu=self.vendor != "cpu")
        self.loads = LoadBook()  # what its /api/ps readings show loaded and evicted (for /metrics)
        self._jobs: dict[str, Job] = {}
        self.slot_time = SlotTime()  # `slot_s` in its state: what each model's requests held here
        self._requesters = Requesters(self._jobs, settings.ping_interval_s, self._wake.closing)
        self._pacer = StatePacer(settings.heartbeat_s)  # when its state is published

    def _changed(self, *, claims: bool = False, state: bool = False, refresh: bool = False) -> None:
        """The one way the state machines' answers reach the loops: re-check claim subscriptions,
        publish the state, re-read Ollama."""
        self._wake.wake(claims=claims, state=state, refresh=refresh)

    def _apply(self, change: RunnerChange) -> None:
        self._changed(claims=change.claims, state=change.state, refresh=change.refresh)

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until `stop`; the whole life of the agent, background work in one TaskGroup."""
        if self.lifecycle is not Lifecycle.NEW:
            raise RuntimeError("an agent runs once")
        self.lifecycle = Lifecycle.RUNNING
        try:
            if not await self._wake.unless_stopped(self._open()):  # nothing taken yet, nothing to drain
                log.warning("agent %s stopped before it was up", self.id)
                return
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                loops = [
                    tg.create_task(supervise("claims", self._reconcile_loop), name="claims"),
                    tg.create_task(supervise("state", self._state_loop), name="state"),
                    tg.create_task(supervise("refresh", self._refresh_loop), name="refresh"),
                    tg.create_task(supervise("ping", self._requesters.run), name="ping"),
                ]
                self.ready.set()
                log.info("agent %s (%s) serving %s", self.id, self.vendor, self.settings.ollama_url)
                await self._wake.stop.wait()
                await self._drain()
                self._wake.closing.set()
                await cancel_and_wait(loops)  # they park on events; nothing is left for them to do
        finally:
            try:
                await self._close()
            finally:
                self.lifecycle = Lifecycle.STOPPED
                self._wake.done.set()

    async def stop(self) -> None:
        """Drain and stop; idempotent and safe before start."""
        if self.lifecycle is Lifecycle.NEW:
            self.lifecycle = Lifecycle.STOPPED
            self._wake.done.set()
            return
        self._wake.stop.set()
        await self._wake.done.wait()

    async def _open(self) -> None:
        self.nc = nc = await connect(
            self.settings.nats_url,
            name=f"corral-agent-{self.id}",
            auth=NatsAuth.of(self.settings),
            on_closed=self._wake.connection_closed,
            on_reconnected=self._reconnected,
        )
        js, replicas = nc.jetstream(), self.settings.js_replicas
        buckets = await ensure_buckets_at_start(js, self.subjects, replicas=replicas)
        await refuse_taken_id(buckets.agents, self.state(), self.settings.heartbeat_s)  # then left untouched
        self._own = OwnState(buckets.agents, self.id, self._backend.started_at, self._wake.stop_for_good)
        self._reopener = Reopener(nc, self.subjects, lambda: self._changed(state=True), replicas=replicas)
        self._reopener.start()
        self._worker = Worker(
            nc,
            self.ollama,
            templates=(self.subjects.agent_work_template, self.subjects.work_template),
            tracer=self._tracer,
            on_response=self._on_response,
            on_answered=self._on_answered,
        )
        self._claims = Claims(nc, self.subjects, self.vendor, on_claim=self._on_claim, on_nudge=self._on_nudge,
                              retry=lambda: self._changed(claims=True),
                              reserve=min(self.settings.batch_reserve, self.settings.parallel - 1))  # fmt: skip
        await self._requesters.start(nc)
        await self.ollama.start()
        await self._refresh()
        self._subs.append(await nc.subscribe(self.subjects.agent_work(self.id), cb=self._on_direct))
        self._subs.append(await nc.subscribe(self.subjects.agent_ctl(self.id), cb=self._on_ctl))
        self._subs.append(await nc.subscribe(self.subjects.agent_admin(self.id), cb=self._on_admin))
        await self._publish_state()

    @property
    def connection_lost(self) -> bool:
        return self._wake.lost.is_set()  # stopped by NATS closing it for good, or by its id's first holder

    def _reconnected(self) -> None:
        """Back on NATS (maybe a restarted server that lost the buckets): open them again (retried),
        say who we are at once, and look at the fleet queue, whose nudges meanwhile reached nobody."""
        if self._reopener is not None:
            self._reopener.request()
        if self._claims is not None:
            self._claims.look_at_queues()
        self._changed(claims=True, state=True)

    async def _drain(self) -> None:
        assert self._claims is not None
        self.lifecycle = Lifecycle.DRAINING
        self.status = "draining"
        await self._claims.drop()
        if self.nc is not None and self.nc.is_connected:  # else nobody reads it: heartbeats stop
            await self._publish_state()
        for _, job in self.slots.waiters():
            job.cancel()
        await finish_within(list(self._jobs.values()), self.settings.drain_grace_s, self.id)

    async def _close(self) -> None:
        if self._reopener is not None:
            await self._reopener.stop()
        if self.nc is not None:
            await leave(self.nc, self._own, self.id)
        await self.ollama.close()

    # -- work intake -------------------------------------------------------------------------
    async def _job_from(self, msg: Msg) -> Job | None:
        assert self.nc is not None
        return await job_from(msg, self.nc, self.subjects, self.id, self.settings.allowed_registries)

    @guarded
    async def _on_claim(self, msg: Msg) -> None:
        """A delivery on an armed claim subscription (it is spent now)."""
        assert self._claims is not None and self.nc is not None
        await self._claims.spent(msg)
        job = await self._job_from(msg)
        if job is None:
            self._changed(claims=True)  # re-arm the spent subscription
            return
        if self.status != "active" or job.token is None or not self._claims.claim(msg, self.slots, job):
            await send_busy(self.nc, job.reply, self.id)  # a sibling claim fired too, or none to spare
            self._changed(claims=True)
            return
        self._start(job)

    @guarded
    async def _on_direct(self, msg: Msg) -> None:
        assert self.nc is not None
        # displaced: another process holds this id, and its requests are not ours to answer, even busy
        job = None if self._own is not None and self._own.displaced else await self._job_from(msg)
        if job is None:
            return
        if self.status != "active" or self._tg is None:  # draining, or announced but not yet running
            await send_busy(self.nc, job.reply, self.id)
            return
        if job.token is not None:
            admission = self.slots.admit(job.token, job, wait=not job.env.now)
            if admission is Admission.FULL:
                await send_busy(self.nc, job.reply, self.id)
                return
            if admission is Admission.QUEUED:
                job.slot = asyncio.get_running_loop().create_future()
        self._start(job)

    @guarded
    async def _on_nudge(self, msg: Msg) -> None:
        assert self._claims is not None
        if self._claims.nudged(msg.subject.rsplit(".", 1)[-1], self.runners.warm):
            self._changed(claims=True)

    async def _take(self, token: str, msgs: list[Msg]) -> None:
        """Requests taken off the fleet queue for ``token`` (fewer than its free slots)."""
        assert self.nc is not None
        for msg in msgs:
            job = await self._job_from(msg)
            if job is None:
                continue
            if job.token is not None and not self.slots.claim(job.token, job):
                await send_busy(self.nc, job.reply, self.id)  # a slot went meanwhile
                continue
            self._start(job)

    def _start(self, job: Job) -> None:
        """Run an admitted job (holding its slot, or waiting for one) in the agent's task group."""
        assert self._tg is not None
        self._jobs[job.rid] = job
        self._requesters.watch(job)
        job.out.claim_soon()
        job.task = self._tg.create_task(self._execute(job), name=f"job-{job.rid}")
        self._changed(claims=True, state=True)

    async def _execute(self, job: Job) -> None:
        """One job's whole life here. Nothing but cancellation leaves it, and that only ends this
        job: an error ends its reply with ``internal`` instead of stopping the agent."""
        assert self._worker is not None and self.nc is not None
        token, env = job.token, job.env
        try:
            job.started = True
            if job.cancel_on_start:
                raise asyncio.CancelledError  # cancelled before this first step (`Job.cancel`)
            if job.slot is not None:
                await job.slot  # granted when a slot passes to it, in FIFO order
            if token is not None and not env.unload and env.endpoint in MODEL_ENDPOINTS:
                if self.runners.yields(token):  # a load under way unloads it: Ollama would load it back
                    return await send_busy(self.nc, job.reply, self.id)
                gone = lambda: evicted_by(token, env.num_ctx, self.state())  # noqa: E731 - asked only for a load
                self._apply(self.runners.will_run(token, job.rid, env.num_ctx, gone))
            status = await self._worker.run(job)
            if token is not None:  # one ``events.request`` each: what the aggregator's rates are made of
                await report_finished(self.nc, self.subjects.event("request"), job, self.id, status)
                load_s, ran_s = load_seconds(job), ran_seconds(job)
                self._apply(self.runners.served(token, env.num_ctx, status, job.rid, load_s, ran_s))
            if (env.unload or env.keep_alive) and 200 <= status < 300:  # pulls: `_on_answered`
                self._changed(refresh=True)  # what is loaded, or until when, changed: advertise it now
        except asyncio.CancelledError:  # the job ends here; the TaskGroup must not see it as its own
            await job.end_reply(job.ending)
            await report_failed(self.nc, self.subjects.event("request"), job, self.id)
        except Exception as e:
            log.exception("request %s (%s %s) failed", job.rid, env.method, env.endpoint)
            await job.end_reply(InternalError(f"agent error: {e}"))
        finally:
            job.out.close()
            if self._jobs.get(job.rid) is job:
                del self._jobs[job.rid]
            if token is not None:  # its time moves from running (`_jobs`) to finished in one step
                self.slot_time.ended(job.slot_token, ran_seconds(job))
                self._apply(self.runners.ended(token, job.rid, time.monotonic()))
                self._end_slot(token, job)
            self._changed(claims=True, state=True)

    def _end_slot(self, token: str, job: Job) -> bool:
        """``job`` is done with its slot (or its place in line); True when a slot became free."""
        ended = self.slots.end(token, job)
        nxt = ended.granted
        if nxt is not None and nxt.slot is not None and not nxt.slot.done():
            nxt.slot.set_result(None)  # the slot passes straight to the next in line
        return ended.freed

    def _on_response(self, job: Job, status: int) -> None:
        if not status:  # Ollama did not answer (refused, reset): take nothing more until it reads again
            self._backend.down = True
            self._changed(claims=True, state=True, refresh=True)
        elif job.token is not None:
            self._apply(self.runners.responded(job.token, job.rid, status))

    async def _on_answered(self, job: Job) -> None:
        """Ollama has finished ``job``: publish what it changed (on disk, a load, an unload), free its slot, arm
        its claim — all before the reply's last message goes out, so a client answered at once finds a
        just-pulled model in the fleet and the slot armed (not a direct send or the queue). Requests
        waiting here or in the fleet queue keep their turn: the slot passes to them and nothing is armed."""
        env, token, late = job.env, job.token, self.runners.shows_late(job.token, job.rid)  # a load
        if env.endpoint in _CHANGES_MODELS or env.unload or env.expires_now or late:
            await self._refresh()
            await self._publish_state()
        if token is None or job.released:
            return
        job.released = True
        freed = self._end_slot(token, job)
        assert self._claims is not None
        if not freed or self.status != "active" or token not in self.runners.claimable:
            return
        if not self._claims.queue_waits(token):
            await self._claims.arm_free(token, self.slots.free(token))

    @guarded
    async def _on_ctl(self, msg: Msg) -> None:
        """A cancel or a read (of the reply), from whoever sent the request (drain: `_on_admin`)."""
        assert self.nc is not None
        h = msg.headers or {}
        job, kind = self._jobs.get(h.get(H.REQUEST, "")), h.get(H.CTL)
        if job is not None and kind == H.READ_CTL:
            job.out.took(h.get(H.READ, ""))
        elif job is not None and kind == H.CANCEL:
            log.info("cancelling request %s at the gateway's request", job.rid)
            job.cancel()
        if usable_reply(msg.reply):
            await self.nc.publish(msg.reply, b"")

    @guarded
    async def _on_admin(self, msg: Msg) -> None:
        """Drain, cordon, uncordon: the operator's, on a subject of their own (`agent_admin`)."""
        assert self.nc is not None
        kind = (msg.headers or {}).get(H.CTL)
        if kind in (H.DRAIN, H.CORDON, H.UNCORDON):
            self.status = {H.DRAIN: "draining", H.CORDON: "cordoned"}.get(kind, "active")
            self._changed(claims=True, state=True)
        if usable_reply(msg.reply):
            await self.nc.publish(msg.reply, b"")  # an empty ack: the request's headers stay here

    # -- claim subscriptions -----------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        while not self._wake.closing.is_set():
            await self._wake.claims.wait()
            self._wake.claims.clear()
            if self.lifecycle is not Lifecycle.RUNNING:
                continue
            try:
                await self._reconcile()
            except (NatsError, JetStreamError, TimeoutError):
                # the next change retries; a connection that is back re-arms everything then
                log.exception("cannot update claim subscriptions")

    async def _reconcile(self) -> None:
        assert self._claims is not None
        await self._claims.reconcile(
            self._claimable, self.slots.free, self._take, lambda: self.runners.offloaded
        )

    def _claimable(self) -> frozenset[str]:
        """Models whose free slots it holds interest in: the warm ones, while active and Ollama answers."""
        return self.runners.warm if self.status == "active" and not self._backend.down else frozenset()

    # -- backend state -----------------------------------------------------------------------
    async def _refresh(self) -> None:
        b, heard, down = self._backend, {j.rid: j.last_bytes for j in self._jobs.values()}, self._backend.down
        reading, busy = await b.read(), self.slots.busy_tokens()
        for job, why in b.stuck(list(self._jobs.values()), heard, self.runners.ready):  # would wait for good
            job.fail(BackendError(why))
        self.loads.observe(reading.loaded, busy | self.runners.ready)  # ready: answered, so ours
        self._apply(self.runners.observe(reading.loaded, reading.trained, busy, b.default_num_ctx()))
        self._changed(state=reading.changed or down != b.down, claims=down and not b.down)  # back: re-arm

    async def _refresh_loop(self) -> None:
        while not self._wake.closing.is_set():
            await wait_at_most(self._wake.refresh, self._backend.next_read_s(self.settings.refresh_s))
            self._wake.refresh.clear()
            await self._refresh()
            await wait_at_most(self._wake.closing, REFRESH_GAP_S)  # requests asking often: not back to back

    def state(self) -> AgentState:
        b, busy = self._backend, self.slots.busy_tokens()
        return AgentState(
            id=self.id,
            vendor=self.vendor,
            host=self.settings.advertise_host or socket.gethostname(),
            ollama_url=self.settings.ollama_url,
            ollama_version=b.version,
            ollama_down=b.down,
            status=self.status,  # type: ignore[arg-type]
            gpus=b.gpus,
            models=b.models,
            loaded=b.loaded,
            loading=self.runners.loading(busy),
            loading_ctx=self.runners.loading_ctx(),
            parallel=self.settings.parallel,
            default_num_ctx=b.default_num_ctx(),
            default_ctx=dict(self.runners.learned_ctx),
            trained_ctx=self.runners.trained,
            model_meta=b.model_meta,
            busy_models=self.runners.busy_models(busy, time.monotonic()),
            load_s=dict(self.runners.load_s),
            request_s=dict(self.runners.request_s),
            slot_s=self.slot_time.totals((j.slot_token, ran_seconds(j)) for j in self._jobs.values()),
            max_loaded=self.settings.max_loaded_models,
            in_flight=self.slots.in_flight,
            queued=self.slots.queued,
            max_queue=self.settings.max_queue,
            started_at=b.started_at,
            updated_at=time.time(),
            heartbeat_s=self.settings.heartbeat_s,
        )

    async def _publish_state(self, state: AgentState | None = None, reading: Reading | None = None) -> None:
        """Publish ``state`` (default: as it is now); ``reading``: its `parts`, if made already."""
        assert self._own is not None
        state = state or self.state()
        try:
            await self._own.put(agent_state_encoder.encode(state))
        except (NatsError, JetStreamError, TimeoutError) as e:
            again = self._pacer.failed(time.monotonic())
            log.warning("cannot publish agent state (again in %.1fs): %s", again, e)
            if self._reopener is not None:
                self._reopener.missing(e)  # a bucket a restarted NATS lost: create it again
        else:
            self._pacer.published(time.monotonic(), *(reading or parts(state)))

    async def _state_loop(self) -> None:
        """Publish on change and on every heartbeat, as `StatePacer` decides; at most every 100 ms."""
        pacer = self._pacer
        while not self._wake.closing.is_set():
            live = self.lifecycle in _HEARD  # a draining agent heartbeats until its last request ends
            due = pacer.until_heartbeat(time.monotonic()) if live else self.settings.heartbeat_s
            await wait_at_most(self._wake.state, due)
            self._wake.state.clear()
            if self.lifecycle in _HEARD:
                pace = pacer.decide(time.monotonic(), *(reading := parts(state := self.state())))
                if pace is Pace.SETTLE:  # request counts alone changed: publish them if they stand
                    await wait_at_most(self._wake.closing, pacer.settle_s)
                    pace = pacer.decide(time.monotonic(), *(reading := parts(state := self.state())))
                if pace is Pace.PUBLISH and self.lifecycle in _HEARD:
                    await self._publish_state(state, reading)
            await wait_at_most(self._wake.closing, 0.1)
