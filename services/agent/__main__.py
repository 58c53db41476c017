"""``corral agent``: stand beside one Ollama and serve its share of the fleet's work."""

from __future__ import annotations

import argparse
import asyncio
import logging

import msgspec
from corral.agent.agent import Agent
from corral.agent.gpu import GpuProbe, detect_vendor
from corral.agent.settings import AgentSettings
from corral.runtime.logs import setup_logging
from corral.runtime.process import add_common_arguments, overrides, run, wait_for_signal
from corral.runtime.settings import load_settings
from corral.runtime.telemetry import setup_tracing

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="corral agent",
        description="Claim work for one Ollama server: start one agent per `ollama serve`.",
    )
    p.add_argument("--ollama", dest="ollama_url", help="the Ollama to serve (default http://127.0.0.1:11434)")
    p.add_argument("--vendor", help="nvidia | amd | intel | apple | cpu (default: detect)")
    p.add_argument("--id", help="agent id, unique in the fleet (default: <hostname>-<ollama port>)")
    p.add_argument(
        "--parallel",
        type=int,
        help="slots per loaded model; set to the Ollama's OLLAMA_NUM_PARALLEL (default 1)",
    )
    p.add_argument(
        "--max-queue",
        dest="max_queue",
        type=int,
        help="requests waiting here for a slot before answering busy (default 64)",
    )
    p.add_argument("--vram-gb", dest="vram_gb", type=float, help="override the GPU probe with this much VRAM")
    add_common_arguments(p)
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
    args = parser().parse_args(argv)
    settings = load_settings(
        AgentSettings, overrides(args, "ollama_url", "vendor", "id", "parallel", "max_queue", "vram_gb")
    )
    setup_logging(settings.log_level, service="agent")
    return run(serve(settings))


if __name__ == "__main__":
    raise SystemExit(main())
