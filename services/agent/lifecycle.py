"""The agent's lifecycle: its states, the events its loops wait on, its default id."""

from __future__ import annotations

import asyncio
import enum
import socket
from dataclasses import dataclass, field


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
