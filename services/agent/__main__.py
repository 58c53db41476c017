"""``corral agent``: stand beside one Ollama and serve its share of the fleet's work.

With ``--docker`` it stands beside every Ollama container of a Docker engine instead, one agent
each (`corral.agent.docker`); with ``--spawn`` it starts one ``ollama serve`` per GPU of this host
and stands beside each (`corral.agent.spawn`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable

import msgspec
from corral.agent.agent import Agent
from corral.agent.agentset import AgentSet
from corral.agent.gpu import GpuProbe, detect_vendor
from corral.agent.metrics import registry_for
from corral.agent.multi import Agents, DockerAgents, Probes, SpawnedAgents
from corral.agent.settings import AgentSettings
from corral.runtime.metricsserver import metrics_served
from corral.runtime.process import service_main, wait_for_signal
from corral.runtime.settings import add_arguments
from corral.runtime.tasks import cancel_and_wait
from corral.runtime.telemetry import setup_tracing

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="corral agent",
        description="Claim work for one Ollama server: start one agent per `ollama serve` "
        "(--docker: one per Ollama container; --spawn: one `ollama serve` and agent per GPU).",
    )
    add_arguments(p, AgentSettings)
    return p


async def serve(settings: AgentSettings) -> int:
    if settings.docker and settings.spawn:
        log.error("--docker and --spawn exclude each other: run one agent process for each")
        return 2
    provider = setup_tracing("corral-agent", endpoint=settings.otlp_endpoint)
    try:
        if settings.docker:
            return await serve_many(settings, lambda agents, probes: DockerAgents(settings, agents, probes))
        if settings.spawn:
            # the Ollamas start from the agent's own environment, as from a shell: PATH, HOME, proxies
            environ = dict(os.environ)
            return await serve_many(
                settings, lambda agents, probes: SpawnedAgents(settings, agents, probes, environ=environ)
            )
        return await serve_one(settings)
    finally:
        if provider is not None:
            provider.shutdown()


async def serve_one(settings: AgentSettings) -> int:
    vendor = settings.vendor or detect_vendor()
    probe = GpuProbe(vendor, vram_gb_override=settings.vram_gb or None)
    agent = Agent(msgspec.structs.replace(settings, vendor=vendor), probe=probe.refresh)
    try:  # a metrics port already taken still closes the probe
        async with metrics_served(registry_for(lambda: [agent]), settings.metrics_port):
            task = asyncio.create_task(agent.run())
            stop = asyncio.create_task(wait_for_signal())
            await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
            await agent.stop()
            await cancel_and_wait([stop])
            await task
    finally:
        probe.close()
    return 1 if agent.connection_lost else 0


async def serve_many(settings: AgentSettings, make: Callable[[AgentSet, Probes], Agents]) -> int:
    """Run the agents ``make`` manages until a signal, or until one ends on its own (exit 1); then
    drain every agent, and only then stop what they serve."""
    agents, probes = AgentSet(), Probes(settings.vram_gb)
    try:  # a metrics port already taken still closes the probes
        # every agent of this process, labelled by its id
        async with metrics_served(registry_for(agents.agents), settings.metrics_port):
            manager = make(agents, probes)
            managing = asyncio.create_task(manager.run(), name="agents")
            signalled = asyncio.create_task(wait_for_signal(), name="signals")
            ended = asyncio.create_task(agents.ended.wait(), name="ended")
            try:
                await asyncio.wait((managing, signalled, ended), return_when=asyncio.FIRST_COMPLETED)
            finally:
                await agents.stop()
                await manager.stop()
                await cancel_and_wait([managing, signalled, ended])
                await agents.stop()  # any added while the manager stopped
    finally:
        probes.close()
    failed = managing.done() and not managing.cancelled() and managing.exception() is not None
    if failed:
        log.error("stopped: %s", managing.exception())
    return 1 if failed or agents.ended.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    return service_main(parser(), AgentSettings, argv, "agent", serve)


if __name__ == "__main__":
    raise SystemExit(main())
