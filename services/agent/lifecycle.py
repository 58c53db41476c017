"""The agent's lifecycle: its states, the events its loops wait on, its default id, and the check
that each job's requester is still there."""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import socket
import time
from collections.abc import Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.agent.worker import Job
from corral.protocol import headers as H
from corral.protocol.errors import AgentUnavailable, Cancelled
from corral.runtime.fleet import OwnState
from corral.runtime.tasks import cancel_and_wait
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError

log = logging.getLogger(__name__)


class Lifecycle(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(eq=False)
class Wakeups:
    """What the agent's loops wait on; set only through the agent's ``_changed`` (and on stop)."""

    claims: asyncio.Event = field(default_factory=asyncio.Event)  # re-check claim subscriptions
    state: asyncio.Event = field(default_factory=asyncio.Event)  # publish the agent's state
    refresh: asyncio.Event = field(default_factory=asyncio.Event)  # re-read Ollama now
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # asked to stop
    closing: asyncio.Event = field(default_factory=asyncio.Event)  # drained: the loops end
    done: asyncio.Event = field(default_factory=asyncio.Event)  # stopped
    # NATS closed for good, or another agent process holds its id: exit non-zero
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self, *, claims: bool, state: bool, refresh: bool) -> None:
        """Set the events of the loops that have something to do."""
        for wanted, event in ((claims, self.claims), (state, self.state), (refresh, self.refresh)):
            if wanted:
                event.set()

    def connection_closed(self) -> None:
        """The NATS connection closed: by our own stop, or for good (then the agent stops)."""
        self.stop_for_good("the NATS connection is closed for good: the agent stops")

    def stop_for_good(self, why: str) -> None:
        """Stop, to exit non-zero, saying ``why`` (unless stopping already): the connection closed
        for good, or another agent process held this agent's id first (`corral.runtime.fleet.OwnState`)."""
        if not self.stop.is_set():
            log.error("%s", why)
            self.lost.set()
            self.stop.set()

    async def unless_stopped(self, opening: Coroutine[Any, Any, None]) -> bool:
        """Run ``opening`` until it ends, or until `stop` is set (it is then cancelled); True when
        it ended, with its error raised. An agent stopped while it waits for NATS ends then, where
        it used to wait for a connection that may never come (Ctrl-C did nothing)."""
        opened = asyncio.ensure_future(opening)
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait((opened, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([t for t in (opened, stopped) if not t.done()])
        if opened.cancelled():
            return False
        opened.result()
        return True


def default_agent_id(ollama_url: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(ollama_url)
    raw = f"{socket.gethostname()}-{u.port or 11434}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw).lower()


async def wait_at_most(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds (no task per wait, unlike wait_for)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return


async def finish_within(jobs: Collection[Job], grace_s: float, agent_id: str) -> None:
    """A draining agent's running ``jobs`` finish within ``grace_s``; the rest end then, each reply
    saying why (a stream under way shows it as its error line; one not begun goes elsewhere)."""
    running = [j.task for j in jobs if j.task is not None]
    if not running:
        return
    log.info("draining: waiting up to %.0fs for %d requests", grace_s, len(running))
    _, pending = await asyncio.wait(running, timeout=grace_s)
    why = AgentUnavailable(f"agent {agent_id} stopped: its drain grace of {grace_s:g}s ran out")
    for job in jobs:
        if job.task in pending:
            job.fail(why)
    await cancel_and_wait(pending)  # again until they end: nats-py can swallow one cancel


async def leave(nc: NATS, own: OwnState | None, agent_id: str) -> None:
    """The last step of a stop: remove the agent's state (unless another process wrote it since:
    `OwnState.delete`) and drain the connection — or, with NATS away, just close it: a delete or a
    drain would only wait for a server that is not there. The state then expires by itself (missed
    heartbeats); what could not be sent is lost with it."""
    if nc.is_closed:
        return
    if not nc.is_connected:
        log.warning("agent %s stopping without NATS: closing the connection", agent_id)
        await _close(nc)
        return
    if own is not None:
        try:
            await own.delete()
        except (NatsError, JetStreamError, TimeoutError) as e:
            log.warning("cannot remove agent %s from the fleet: %s", agent_id, e)
    try:
        await nc.drain()
    except (NatsError, TimeoutError) as e:
        # NATS went away meanwhile ("connection reconnecting"): a drain that failed leaves the
        # connection open, and nats-py would go on reconnecting for good, the process with it
        log.warning("draining the NATS connection: %s; closing it", e)
        await _close(nc)


async def _close(nc: NATS) -> None:
    """Close ``nc`` whatever state it is in."""
    try:
        await nc.close()
    except (OSError, RuntimeError, NatsError) as e:
        # nats-py writes what it still held to the dead socket: asyncio raises an OSError,
        # uvloop a RuntimeError ("the handler is closed"). The connection is closed either way.
        log.debug("closing the NATS connection: %r", e)


class Requesters:
    """Every job's requester, kept informed and checked on until ``closing``: every ``interval``
    seconds each job's reply gets a ping (the keep-alive of a silent one) whose reply-to is a probe
    (`corral.agent.probes`); a job whose requester is gone is cancelled, so its Ollama stops
    generating for nobody. Probes come back on one subscription, under an inbox of the agent's."""

    def __init__(self, jobs: Mapping[str, Job], interval: float, closing: asyncio.Event) -> None:
        self._closing = closing
        self._jobs = jobs
        self._interval = interval
        self._nc: NATS | None = None
        self._inbox = ""
        self._watched: dict[str, Job] = {}  # probe key → the job it names
        self._keys = itertools.count()

    async def start(self, nc: NATS) -> None:
        self._nc = nc
        self._inbox = nc.new_inbox()
        await nc.subscribe(self._inbox + ".>", cb=self._on_answer)

    async def run(self) -> None:
        """Ping until the agent is closing."""
        while not self._closing.is_set():
            await wait_at_most(self._closing, self._interval / 2)
            if self._nc is None or not self._nc.is_connected:
                continue  # held back until a reconnect, pings would all meet nobody at once
            now = time.monotonic()
            self._watched = {k: j for k, j in self._watched.items() if self._jobs.get(j.rid) is j}
            for job in list(self._jobs.values()):
                if not job.out.done and now - job.out.last_pinged >= self._interval:
                    try:
                        await job.out.ping(self._probe(job))
                    except NatsError as e:
                        log.warning("cannot ping request %s: %s", job.rid, e)

    def watch(self, job: Job) -> None:
        """Check on ``job``'s requester from its claim on (the claim carries the first probe)."""
        if self._inbox and not job.out.claimed:
            self._key(job)
            job.out.probe = f"{self._inbox}.{job.probes.key}.{job.probes.claim()}"

    def _key(self, job: Job) -> None:
        if not job.probes.key:
            job.probes.key = str(next(self._keys))
            self._watched[job.probes.key] = job

    def _probe(self, job: Job) -> str | None:
        if not self._inbox:
            return None
        self._key(job)
        return f"{self._inbox}.{job.probes.key}.{job.probes.next()}"

    async def _on_answer(self, msg: Msg) -> None:
        if (msg.headers or {}).get(H.NATS_STATUS) != "503":
            return  # only "no responders" comes here: NATS's, never a requester's
        key, _, n = msg.subject[len(self._inbox) + 1 :].partition(".")
        job = self._watched.get(key)
        if job is None or not n.isdigit() or job.probes.gone or not job.probes.missed(int(n)):
            return
        if job.probes.is_claim(int(n)):  # its requester sends it elsewhere, if it is there at all
            log.warning("nobody heard the claim of %s on %s: dropping it", job.rid, job.reply)
        else:
            log.warning(
                "the requester of %s is gone (nobody listens on %s): cancelling it", job.rid, job.reply
            )
        job.fail(Cancelled("the requester is gone"))
