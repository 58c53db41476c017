"""``corral gateway``: the Ollama-compatible HTTP endpoint of the fleet."""

from __future__ import annotations

import argparse
import logging

from corral.gateway.app import Gateway
from corral.gateway.settings import GatewaySettings
from corral.runtime.process import AsgiServer, service_main, wait_for_stop
from corral.runtime.settings import add_arguments
from corral.runtime.telemetry import setup_tracing

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="corral gateway",
        description="Serve the Ollama API (and /v1) for the whole fleet. Point any Ollama client here.",
    )
    add_arguments(p, GatewaySettings)
    return p


async def serve(settings: GatewaySettings) -> int:
    provider = setup_tracing("corral-gateway", endpoint=settings.otlp_endpoint)
    gateway = Gateway(settings)
    await gateway.start()  # NATS before HTTP: a refused identity ends here, said in one line
    server = AsgiServer(
        gateway,
        settings.host,
        settings.port,
        log_level=settings.log_level,
        header_timeout_s=settings.header_timeout_s,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
    )
    try:
        await server.start()
    except BaseException:
        await gateway.stop()
        raise
    log.info("gateway listening on %s", server.url)
    try:
        lost = await wait_for_stop(gateway.lost)
    finally:
        gateway.begin_stop(server.grace_s)
        await server.stop()
        if provider is not None:
            provider.shutdown()
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> int:
    return service_main(parser(), GatewaySettings, argv, "gateway", serve)


if __name__ == "__main__":
    raise SystemExit(main())
