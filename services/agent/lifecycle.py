"""The agent's lifecycle: its states, the events its loops wait on, its default id."""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from corral.agent.worker import Job
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from nats.js.kv import KeyValue

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
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # NATS closed for good: exit non-zero

    def connection_closed(self) -> None:
        """The NATS connection closed: by our own stop, or for good (then the agent stops)."""
        if not self.stop.is_set():
            log.error("the NATS connection is closed for good: the agent stops")
            self.lost.set()
            self.stop.set()


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


async def leave(nc: NATS, agents: KeyValue | None, agent_id: str) -> None:
    """The last step of a stop: remove the agent's state and drain the connection — or, with NATS
    away, just close it: a delete or a drain would only wait for a server that is not there. The
    state then expires by itself (missed heartbeats); what could not be sent is lost with it."""
    if nc.is_closed:
        return
    if not nc.is_connected:
        log.warning("agent %s stopping without NATS: closing the connection", agent_id)
        try:
            await nc.close()
        except (OSError, RuntimeError, NatsError) as e:
            # nats-py writes what it still held to the dead socket: asyncio raises an OSError,
            # uvloop a RuntimeError ("the handler is closed"). The connection is closed either way.
            log.debug("closing the NATS connection: %r", e)
        return
    if agents is not None:
        try:
            await agents.delete(agent_id)
        except (NatsError, JetStreamError, TimeoutError) as e:
            log.warning("cannot remove agent %s from the fleet: %s", agent_id, e)
    try:
        await nc.drain()
    except (NatsError, TimeoutError) as e:
        log.warning("draining the NATS connection: %s", e)


async def ping_silent(jobs: Mapping[str, Job], interval: float, closing: asyncio.Event) -> None:
    """Keep silent requests (Ollama loading a model, or a queued job) visibly alive: a ping on each
    reply that has sent nothing for ``interval`` seconds, until ``closing``."""
    while not closing.is_set():
        await wait_at_most(closing, interval / 2)
        now = time.monotonic()
        for job in list(jobs.values()):
            if not job.out.done and now - job.out.last_sent >= interval:
                try:
                    await job.out.ping()
                except NatsError as e:
                    log.warning("cannot ping request %s: %s", job.rid, e)
