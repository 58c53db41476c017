"""The bound on request headers at the HTTP edge, against a real gateway socket: a client that opens
a connection and sends no header block, or trickles one a byte at a time, is cut off after
``header_timeout_s``; one over 1 MiB is answered 431; an idle kept-alive connection between
requests is not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
HEADER_TIMEOUT_S = 0.5
CLOSED_WITHIN_S = 10.0  # generous: the bound is the setting, this only keeps a broken test from hanging
REQUEST = b"POST /api/generate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="edgeheaders",
        sims=default_sims(1, time_scale=0.01),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={"header_timeout_s": HEADER_TIMEOUT_S},
        registry=None,
        aggregator=None,
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


@contextlib.asynccontextmanager
async def _connection(url: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection (EOF)."""
    async with asyncio.timeout(CLOSED_WITHIN_S):
        return await reader.read()


def _generate() -> bytes:
    body = b'{"model":"%s","prompt":"hi","stream":false}' % MODEL.encode()
    return REQUEST % (len(body), body)


async def _one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(_generate())
    await writer.drain()
    async with asyncio.timeout(CLOSED_WITHIN_S):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        assert b'"done":true' in await reader.readexactly(length)


async def test_a_connection_that_sends_nothing_is_closed(fleet: LocalFleet) -> None:
    async with _connection(fleet.url) as (reader, _):
        assert await _closed(reader) == b""


async def test_half_a_header_block_is_closed_and_the_next_request_is_served(fleet: LocalFleet) -> None:
    async with _connection(fleet.url) as (reader, writer):
        writer.write(b"POST /api/generate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-le")
        await writer.drain()
        assert await _closed(reader) == b""
    async with _connection(fleet.url) as (reader, writer):
        await _one_request(reader, writer)


async def test_headers_trickled_a_byte_at_a_time_are_cut_off(fleet: LocalFleet) -> None:
    """Bytes keep arriving, but the block is never whole: the bound runs from the first byte."""
    async with _connection(fleet.url) as (reader, writer):

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                for _ in range(1000):
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(HEADER_TIMEOUT_S / 10)  # the trickle's pace, not a wait for state

        writer.write(b"GET / HTTP/1.1\r\nx-slow: ")
        sender = asyncio.create_task(trickle())
        try:
            assert await _closed(reader) == b""
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender


async def test_an_idle_kept_alive_connection_still_serves_its_next_request(fleet: LocalFleet) -> None:
    """The header bound is not an idle bound: between requests uvicorn's keep-alive timeout rules."""
    async with _connection(fleet.url) as (reader, writer):
        await _one_request(reader, writer)
        async with _connection(fleet.url) as (silent, _):  # closed once a header timeout has passed ...
            assert await _closed(silent) == b""
        await _one_request(reader, writer)  # ... which this connection sat idle through


async def test_a_header_block_over_a_mebibyte_is_answered_431_as_go_does(fleet: LocalFleet) -> None:
    """An endless header is not kept in memory: past Go's 1 MiB the client is told, and cut off."""
    async with _connection(fleet.url) as (reader, writer):
        writer.write(b"POST /api/generate HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: " + b"a" * (3 << 20))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        answer = await _closed(reader)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:200]
    assert answer.endswith(b"\r\n\r\n431 Request Header Fields Too Large"), answer[-200:]


async def test_a_large_header_block_under_the_bound_is_served(fleet: LocalFleet) -> None:
    body = b'{"model":"%s","prompt":"hi","stream":false}' % MODEL.encode()
    big = b"".join(b"x-many-%d: %s\r\n" % (i, b"v" * 100) for i in range(5000))  # half a MiB
    async with _connection(fleet.url) as (reader, writer):
        writer.write(REQUEST.replace(b"\r\n\r\n", b"\r\n" + big + b"\r\n", 1) % (len(body), body))
        await writer.drain()
        async with asyncio.timeout(CLOSED_WITHIN_S):
            head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head


@pytest.mark.parametrize("path", ["/api/generate", "/v1/completions"])
async def test_an_http_10_client_reads_a_stream_to_the_connections_end_never_chunked(
    fleet: LocalFleet, path: str
) -> None:
    """HTTP/1.0 knows no chunked encoding (a client of it, ApacheBench say, would read the chunk
    sizes as text): a streamed answer comes as it is, its end where the connection closes, as Go's
    server (Ollama's) sends it; an answer of known length keeps its Content-Length."""
    body = b'{"model":"%s","prompt":"hi","stream":true,"options":{"num_predict":3}}' % MODEL.encode()
    request = REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0").replace(b"/api/generate", path.encode()) % (
        len(body),
        body,
    )
    async with _connection(fleet.url) as (reader, writer):
        writer.write(request)
        await writer.drain()
        answer = await _closed(reader)  # it ends with the connection
    head, _, streamed = answer.partition(b"\r\n\r\n")
    names = {line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]}
    assert (
        head.startswith(b"HTTP/1.1 200")
        and b"transfer-encoding" not in names
        and b"content-length" not in names
    )
    lines = [line for line in streamed.split(b"\n") if line.strip()]
    if path == "/api/generate":
        assert b'"done":true' in lines[-1] and all(line.startswith(b"{") for line in lines), lines
    else:  # server-sent events
        assert lines[-1] == b"data: [DONE]" and all(line.startswith(b"data: ") for line in lines), lines
    async with _connection(fleet.url) as (reader, writer):  # not streamed: its length, as before
        writer.write(_generate().replace(b"HTTP/1.1", b"HTTP/1.0"))
        await writer.drain()
        whole = await _closed(reader)
    assert b"content-length:" in whole.lower() and b"transfer-encoding" not in whole.lower()
    assert whole.rstrip().endswith(b"}")
