"""Several agents in one process, one per Ollama, added and removed as those Ollamas come and go.

`corral agent --docker` keeps one per running Ollama container, `corral agent --spawn` one per GPU's
``ollama serve``. Each agent is an ordinary `Agent` with its own NATS connection and id; the set only
starts them, stops them (drained: a removed agent leaves the fleet's view as soon as its in-flight
requests end) and says when one ended on its own, which ends the process (exit 1, as a lone agent
whose NATS closed for good does).
"""

from __future__ import annotations

import asyncio
import logging
import socket

from corral.agent.agent import Agent
from corral.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)


def agent_id(host: str, suffix: str) -> str:
    """A stable id for the agent of ``suffix`` (a container's name, ``gpu0``) on ``host``: the same
    on every start, unique in the fleet as long as host names are."""
    raw = f"{host or socket.gethostname()}-{suffix}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw).lower()


class AgentSet:
    """Agents by id. `add` starts one, `remove` drains and stops one (in the background: an agent
    being added under the same id again waits for it, so the old one's leaving cannot erase the new
    one's entry), `stop` stops them all; `ended` is set once an agent stopped without being asked."""

    def __init__(self) -> None:
        self._agents: dict[str, tuple[Agent, asyncio.Task[None]]] = {}
        self._leaving: dict[str, asyncio.Task[None]] = {}
        self.ended = asyncio.Event()

    def __contains__(self, agent_id: str) -> bool:
        return agent_id in self._agents

    def __len__(self) -> int:
        return len(self._agents)

    def agents(self) -> list[Agent]:
        """The agents running now (each scrape of ``--metrics-port`` reads them)."""
        return [agent for agent, _ in self._agents.values()]

    def get(self, agent_id: str) -> Agent | None:
        entry = self._agents.get(agent_id)
        return entry[0] if entry is not None else None

    async def add(self, agent: Agent) -> None:
        """Start ``agent`` (it joins the fleet once connected: see ``agent.ready``) once an agent of
        the same id that is leaving has left."""
        if agent.id in self._agents:
            raise ValueError(f"agent {agent.id!r} runs already")
        leaving = self._leaving.get(agent.id)
        if leaving is not None:
            await asyncio.shield(leaving)
        task = asyncio.create_task(agent.run(), name=f"agent-{agent.id}")
        self._agents[agent.id] = (agent, task)
        task.add_done_callback(lambda t: self._ended(agent, t))
        log.info("agent %s: %s (%s)", agent.id, agent.settings.ollama_url, agent.vendor)

    def remove(self, agent_id: str) -> asyncio.Task[None] | None:
        """Start draining and stopping agent ``agent_id``; the task that does it (None: no agent)."""
        entry = self._agents.pop(agent_id, None)
        if entry is None:
            return self._leaving.get(agent_id)
        task = asyncio.create_task(self._leave(*entry), name=f"leave-{agent_id}")
        self._leaving[agent_id] = task
        task.add_done_callback(lambda _: self._left(agent_id, task))
        return task

    async def stop(self) -> None:
        """Stop every agent at once (each drained within its grace). Idempotent."""
        for agent_id in list(self._agents):
            self.remove(agent_id)
        if self._leaving:
            await asyncio.wait(list(self._leaving.values()))

    @staticmethod
    async def _leave(agent: Agent, task: asyncio.Task[None]) -> None:
        if agent.ready.is_set():
            await agent.stop()
        await cancel_and_wait([task], timeout=agent.settings.drain_grace_s + 10)
        log.info("agent %s left", agent.id)

    def _left(self, agent_id: str, task: asyncio.Task[None]) -> None:
        if self._leaving.get(agent_id) is task:
            del self._leaving[agent_id]

    def _ended(self, agent: Agent, task: asyncio.Task[None]) -> None:
        if self._agents.get(agent.id, (None,))[0] is not agent:
            return  # removed: asked to stop
        del self._agents[agent.id]
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("agent %s failed", agent.id, exc_info=error)
        else:
            log.error(
                "agent %s stopped on its own (NATS closed for good, or another process holds its id)",
                agent.id,
            )
        self.ended.set()
