"""Fleet-wide pulls: ``{root}.registry.pull`` (queue group ``registry``, so one registry copy serves
each pull) takes an Ollama pull body plus ``replicas`` / ``vendor`` / ``all``, chooses the agents
(`corral.routing.pull_order`), runs ``/api/pull`` on each at once and answers with one merged NDJSON
progress stream in the same reply framing agents use (claim, head, data, end): per-layer lines
whose ``total``/``completed`` sum over the agents, ``success`` only when every agent succeeded, an
``{"error": ...}`` line naming the agents that failed otherwise.

The reply names `REGISTRY_SENDER` as its sender, so the asker's cancel (its client went away) comes
on `Subjects.registry_ctl`, which every registry copy hears: the copy running that pull stops it,
and so each agent's pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

import msgspec
from corral.protocol import headers as H
from corral.protocol.envelope import RequestEnvelope, decode_request
from corral.protocol.errors import BadEnvelope, BadRequest, CorralError, ServiceStopping
from corral.protocol.messages import AgentState
from corral.protocol.names import VENDORS, parse_name
from corral.protocol.subjects import REGISTRY_SENDER, Subjects
from corral.routing import pull_order
from corral.runtime.fleet import FleetView
from corral.runtime.nats import published
from corral.runtime.tasks import cancel_and_wait
from corral.transport import Reply, Transport, WorkRequest, fan_out
from corral.transport.replies import ReplyWriter
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
JSON = "application/json; charset=utf-8"
DRAIN_S = 2.0  # a stopping registry waits at most this for the pulls already on their way to it
_enc = msgspec.json.Encoder()


class PullRequest(msgspec.Struct, kw_only=True):
    """What ``{root}.registry.pull`` takes: Ollama's pull body plus where to put the model."""

    model: str = ""
    name: str = ""  # older clients
    insecure: bool = False
    stream: bool | None = None
    replicas: int = 1  # how many agents should end up with it (ignored when ``all``)
    vendor: str | None = None  # only agents of this vendor
    all: bool = False  # every (matching) agent


class _Progress(msgspec.Struct, omit_defaults=True):
    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0


class _Line(msgspec.Struct):
    status: str = ""
    digest: str = ""
    total: int = 0
    completed: int = 0
    error: str = ""


_line = msgspec.json.Decoder(_Line)
_pull_request = msgspec.json.Decoder(PullRequest)


class FleetPulls:
    """Serves the registry's pull subject: each pull runs on its chosen agents at once, its
    progress merged into one reply stream; pings keep a long silent pull's reply alive."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        fleet: FleetView,
        transport: Transport,
        *,
        pull_timeout_s: float,
        ping_interval_s: float,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._fleet = fleet
        self._transport = transport
        self._pull_timeout_s = pull_timeout_s  # one agent's pull may take this long
        self._ping_interval_s = ping_interval_s
        self._pulls: set[asyncio.Task[None]] = set()
        self._by_request: dict[str, asyncio.Task[None]] = {}  # request id → the pull serving it
        self._cancelled: set[str] = set()  # request ids whose asker cancelled them
        self._sub: Subscription | None = None

    async def listen(self, queue: str) -> None:
        """Take pulls from the registry's pull subject, one copy of queue group ``queue`` each."""
        self._sub = await self._nc.subscribe(
            self._subjects.registry("pull"), queue=queue, cb=published(self.on_pull)
        )

    async def on_pull(self, msg: Msg) -> None:
        """A pull request: served in a task of its own (pulls take minutes)."""
        task = asyncio.create_task(self._serve_pull(msg))
        self._pulls.add(task)
        task.add_done_callback(self._pulls.discard)

    async def on_cancel(self, msg: Msg) -> None:
        """An asker cancelled its pull (its client went away): stop it if this copy runs it."""
        h = msg.headers or {}
        rid = h.get(H.REQUEST, "")
        task = self._by_request.get(rid) if h.get(H.CTL) == H.CANCEL else None
        if task is not None:
            log.info("pull %s cancelled by its asker: stopping it on every agent", rid)
            self._cancelled.add(rid)
            task.cancel()

    async def stop(self) -> None:
        """Leave the queue group, then end the pulls under way, one taken a moment ago included
        (`cancel_and_wait` lets it start): each reply ends with `ServiceStopping` (`_serve_pull`),
        so its asker may send it again, to a copy still in the group."""
        if self._sub is not None and self._nc.is_connected:
            # unsubscribed, and the pulls already on their way here taken (each then ended like the
            # rest): an unsubscribe alone would drop them unanswered, to end at their claim timeout.
            # Bounded: a drain waits for the server's answer, which a connection lost meanwhile
            # would keep from a stop for nats-py's ten seconds
            with contextlib.suppress(NatsError, TimeoutError):
                await asyncio.wait_for(self._sub.drain(), DRAIN_S)  # type: ignore[no-untyped-call]
        await cancel_and_wait(set(self._pulls))

    def targets(self, req: PullRequest) -> list[AgentState]:
        agents = pull_order(self._fleet.agents(), parse_name(req.model or req.name).key, req.vendor)
        return agents if req.all else agents[: max(req.replicas, 1)]

    async def _serve_pull(self, msg: Msg) -> None:
        if not self._subjects.is_reply(msg.reply):
            return  # nowhere under the root to answer: a pull nobody can follow is not started
        try:
            env: RequestEnvelope | BadEnvelope = decode_request(msg.headers)
        except BadEnvelope as e:
            env = e
        rid = env.rid if isinstance(env, RequestEnvelope) else ""
        out = ReplyWriter(self._nc, msg.reply, rid, REGISTRY_SENDER)
        task = asyncio.current_task()
        if rid and task is not None:
            self._by_request[rid] = task
        try:
            await self._pull(msg, env, out)
        except asyncio.CancelledError:
            if rid not in self._cancelled:
                # the registry is stopping: its asker hears so now, not at its idle timeout, and may
                # send the pull again to another copy (this one left the queue group first)
                with contextlib.suppress(NatsError):
                    await asyncio.shield(out.end(ServiceStopping("the registry is stopping")))
            raise
        finally:
            self._by_request.pop(rid, None)
            self._cancelled.discard(rid)

    async def _pull(self, msg: Msg, env: RequestEnvelope | BadEnvelope, out: ReplyWriter) -> None:
        await out.claim()
        try:
            if isinstance(env, BadEnvelope):
                raise env
            req = _pull_request.decode(msg.data)
            if not (req.model or req.name):
                raise BadRequest("model is required")
            if req.vendor is not None and req.vendor not in VENDORS:
                raise BadRequest(f"unknown vendor {req.vendor!r}")
            targets = self.targets(req)
            if not targets:
                raise BadRequest(
                    "no agent can take this pull" + (f" (vendor {req.vendor})" if req.vendor else "")
                )
        except (CorralError, msgspec.DecodeError) as e:
            message = e.message if isinstance(e, CorralError) else str(e)
            status = e.status if isinstance(e, CorralError) else 400
            await out.head(status, JSON, _enc.encode({"error": message}), end=True)
            return
        stream = req.stream is not False
        if stream:
            await out.head(200, NDJSON)
            if not req.all and len(targets) < req.replicas:  # said first, in Ollama's own line shape
                await out.data(_enc.encode(_Progress(_fewer(len(targets), req))) + b"\n")
        errors: dict[str, str] = {}  # agent id → its first error
        # a pull is silent for long stretches (all of it, unstreamed): pings keep the gateway's
        # idle timeout from taking the registry for dead
        keepalive = asyncio.create_task(self._ping(out))
        try:
            async for line in self._merged(req, targets, errors):
                if stream:
                    await out.data(line)
        finally:
            await cancel_and_wait([keepalive])
        if stream:
            if errors:
                await out.data(_enc.encode({"error": failure_text(errors, len(targets))}) + b"\n")
            await out.end()
        elif errors:
            await out.head(500, JSON, _enc.encode({"error": failure_text(errors, len(targets))}), end=True)
        else:
            await out.head(200, JSON, _enc.encode(_Progress("success")), end=True)

    async def _ping(self, out: ReplyWriter) -> None:
        while True:
            await asyncio.sleep(self._ping_interval_s)  # a period, not a wait for an event
            await out.ping()

    async def _merged(
        self, req: PullRequest, targets: list[AgentState], errors: dict[str, str]
    ) -> AsyncIterator[bytes]:
        """Run the pull on every target and yield merged progress lines as they come."""
        transport = self._transport
        body = _enc.encode({"model": req.model or req.name, "insecure": req.insecure, "stream": True})
        lines: asyncio.Queue[tuple[str, _Line] | None] = asyncio.Queue()

        async def relay(reply: Reply) -> None:
            if reply.status != 200:
                data = await reply.read()
                await lines.put((reply.agent, _Line(error=_error_text(data) or f"HTTP {reply.status}")))
                return
            async for raw in reply.lines():
                await lines.put((reply.agent, _line.decode(raw)))

        async def run_all() -> None:
            try:
                results = await fan_out(
                    targets,
                    lambda a: transport.send_to(
                        a.id, WorkRequest("/api/pull", body), timeout=self._pull_timeout_s
                    ),
                    relay,
                    tolerate=(CorralError, msgspec.DecodeError),
                )
                for agent, result in zip(targets, results, strict=True):
                    if isinstance(result, Exception):
                        lines.put_nowait((agent.id, _Line(error=str(result))))
            finally:
                lines.put_nowait(None)  # the merge below ends, whatever ended the fan-out

        runner = asyncio.create_task(run_all())
        layers: dict[str, dict[str, tuple[int, int]]] = {}  # digest → agent → (total, completed)
        said: set[str] = set()
        succeeded: set[str] = set()
        try:
            yield _enc.encode(_Progress("pulling manifest")) + b"\n"
            said.add("pulling manifest")
            while (item := await lines.get()) is not None:
                agent_id, line = item
                if line.error:
                    errors.setdefault(agent_id, line.error)
                elif line.status == "success":
                    succeeded.add(agent_id)
                elif line.digest:
                    per = layers.setdefault(line.digest, {})
                    per[agent_id] = (line.total, line.completed)
                    total = sum(t for t, _ in per.values())
                    done = sum(c for _, c in per.values())
                    yield _enc.encode(_Progress(line.status, line.digest, total, done)) + b"\n"
                elif line.status and line.status not in said:
                    said.add(line.status)
                    yield _enc.encode(_Progress(line.status)) + b"\n"
            await asyncio.wait([runner])  # it has put its last line: ending now
            if not runner.cancelled() and (failure := runner.exception()) is not None:
                log.error("pull fan-out of %s failed", req.model or req.name, exc_info=failure)
            for a in targets:
                if a.id not in succeeded:
                    errors.setdefault(a.id, "pull ended without success")
            if not errors:
                yield _enc.encode(_Progress("success")) + b"\n"
        finally:
            await cancel_and_wait([runner])


def failure_text(errors: Mapping[str, str], tried: int) -> str:
    """A failed pull's error, of ``tried`` agents: Ollama's own text when every one failed and said
    the same (one agent, or a model no registry has), else each failed agent's, named (the others
    have the model: which ones did not is what an operator needs)."""
    texts = set(errors.values())
    if len(texts) == 1 and len(errors) >= tried:
        return texts.pop()
    return "; ".join(f"{agent}: {text}" for agent, text in errors.items())


def _error_text(data: bytes) -> str:
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode(errors="replace")
    return str(obj.get("error", "")) if isinstance(obj, dict) else ""


def _fewer(n: int, req: PullRequest) -> str:
    """The line saying a pull goes to fewer agents than the replicas asked for."""
    which = f" of vendor {req.vendor}" if req.vendor else ""
    agents = "agent" if n == 1 else "agents"
    return f"only {n} {agents}{which} can take this pull ({req.replicas} asked for)"
