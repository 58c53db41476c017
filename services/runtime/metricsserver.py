"""A small HTTP server for one Prometheus registry: ``GET /metrics`` on its own port (agents and
aggregators, which serve no HTTP otherwise). Runs on the service's event loop, so collectors read
the service's state between its steps, never beside them from another thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"
READ_TIMEOUT_S: Final = 10.0  # a scraper's request must arrive whole within this
MAX_HEADER_LINES: Final = 100


async def serve_metrics(registry: CollectorRegistry, port: int, host: str = "") -> asyncio.Server:
    """Serve ``registry`` at ``http://host:port/metrics`` (``host`` empty: every interface; ``port``
    0: a free one, see ``server.sockets``). Close it with ``server.close()``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                request = await reader.readline()
                for _ in range(MAX_HEADER_LINES):  # the headers: not needed, read to the blank line
                    if (await reader.readline()).strip() == b"":
                        break
            parts = request.split()
            if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD") and parts[1].split(b"?")[0] == b"/metrics":
                status, ctype, body = b"200 OK", CONTENT_TYPE, generate_latest(registry)
            else:
                status, ctype, body = b"404 Not Found", b"text/plain", b"404 page not found\n"
            head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            writer.write(head % (status, ctype, len(body)))
            if parts[:1] != [b"HEAD"]:
                writer.write(body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError) as e:
            log.debug("metrics request failed: %r", e)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host or None, port)
    log.info("metrics on port %d", server.sockets[0].getsockname()[1])
    return server


class MetricsPortError(OSError):
    """The metrics port cannot be listened on (in use, not allowed): the service says so in one
    line and exits 1."""


@contextlib.asynccontextmanager
async def metrics_served(registry: CollectorRegistry, port: int) -> AsyncIterator[asyncio.Server | None]:
    """A service's metrics port for the life of the block: ``registry`` served on ``port`` (0: off,
    the settings' meaning; yields None), closed however the block ends."""
    if not port:
        yield None
        return
    try:
        server = await serve_metrics(registry, port)
    except OSError as e:
        raise MetricsPortError(f"cannot serve metrics on port {port}: {e.strerror or e}") from None
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
