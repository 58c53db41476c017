"""``corral gateway``: the Ollama-compatible HTTP endpoint of the fleet."""

from __future__ import annotations

import argparse
import logging

from corral.gateway.app import Gateway
from corral.gateway.settings import GatewaySettings
from corral.runtime.logs import setup_logging
from corral.runtime.process import AsgiServer, add_common_arguments, overrides, run, wait_for_signal
from corral.runtime.settings import load_settings
from corral.runtime.telemetry import setup_tracing

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="corral gateway",
        description="Serve the Ollama API (and /v1) for the whole fleet. Point any Ollama client here.",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port to listen on (default 11434, Ollama's)")
    p.add_argument(
        "--queue-timeout",
        dest="queue_timeout_s",
        type=float,
        help="seconds a request may wait for capacity before 503 (default 60)",
    )
    add_common_arguments(p)
    return p


async def serve(settings: GatewaySettings) -> int:
    provider = setup_tracing("corral-gateway", endpoint=settings.otlp_endpoint)
    server = AsgiServer(Gateway(settings), settings.host, settings.port, log_level=settings.log_level)
    await server.start()
    log.info("gateway listening on %s", server.url)
    try:
        await wait_for_signal()
    finally:
        await server.stop()
        if provider is not None:
            provider.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = load_settings(GatewaySettings, overrides(args, "host", "port", "queue_timeout_s"))
    setup_logging(settings.log_level, service="gateway")
    return run(serve(settings))


if __name__ == "__main__":
    raise SystemExit(main())
