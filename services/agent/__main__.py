"""``corral agent``: stand beside one Ollama and serve its share of the fleet's work."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import msgspec
from corral.agent.agent import Agent
from corral.agent.gpu import GpuProbe, detect_vendor
from corral.agent.settings import AgentSettings
from corral.runtime.logs import setup_logging
from corral.runtime.process import run, wait_for_signal
from corral.runtime.settings import SettingsError, add_arguments, settings_from_args
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
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        settings = settings_from_args(AgentSettings, args)
    except SettingsError as e:
        sys.stderr.write(f"{p.prog}: {e}\n")
        return 2
    setup_logging(settings.log_level, service="agent")
    return run(serve(settings))


if __name__ == "__main__":
    raise SystemExit(main())
