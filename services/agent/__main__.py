"""``corral agent``: stand beside one Ollama and serve its share of the fleet's work."""

from __future__ import annotations

import argparse
import asyncio
import logging

import msgspec
from corral.agent.agent import Agent
from corral.agent.gpu import GpuProbe, detect_vendor
from corral.agent.settings import AgentSettings
from corral.runtime.process import service_main, wait_for_signal
from corral.runtime.settings import add_arguments
from corral.runtime.telemetry import setup_tracing

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="corral agent",
        description="Claim work for one Ollama server: start one agent per `ollama serve`.",
    )
    add_arguments(p, AgentSettings)
    return p


async def serve(settings: AgentSettings) -> int:
    provider = setup_tracing("corral-agent", endpoint=settings.otlp_endpoint)
    vendor = settings.vendor or detect_vendor()
    probe = GpuProbe(vendor, vram_gb_override=settings.vram_gb or None)
    agent = Agent(msgspec.structs.replace(settings, vendor=vendor), probe=probe.refresh)
    task = asyncio.create_task(agent.run())
    stop = asyncio.create_task(wait_for_signal())
    await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    await agent.stop()
    stop.cancel()
    probe.close()
    if provider is not None:
        provider.shutdown()
    await task
    return 1 if agent.connection_lost else 0


def main(argv: list[str] | None = None) -> int:
    return service_main(parser(), AgentSettings, argv, "agent", serve)


if __name__ == "__main__":
    raise SystemExit(main())
