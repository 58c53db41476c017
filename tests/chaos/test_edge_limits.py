"""The bounds at the HTTP edge, against a real gateway socket: body size, body time, concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import pytest
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
MAX_BODY = 64 * 1024
MAX_BODIES = 100 * 1024  # all bodies held at once: one large body and a bit


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="edgelimits",
        sims=default_sims(1, time_scale=0.01),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={
            "queue_timeout_s": 5.0,
            "max_body_bytes": MAX_BODY,
            "max_requests": 2,
            "max_bodies_bytes": MAX_BODIES,
            "body_timeout_s": 1.0,
        },
        registry=None,
        aggregator=None,
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


async def _plain(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False}) as r:
            assert r.status == 200, await r.text()


async def _open(url: str, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(head)
    await writer.drain()
    return reader, writer


def _status(raw: bytes) -> int:
    return int(raw.split(b"\r\n", 1)[0].split()[1])


BLOB = "/api/blobs/sha256:" + "a" * 64


@pytest.mark.parametrize("path", ["/api/generate", BLOB, "/api/create"])
async def test_a_body_over_the_cap_is_413(fleet: LocalFleet, path: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fleet.url}{path}", data=b"x" * (MAX_BODY + 1)) as r:
            if path == BLOB:  # a blob with a Content-Length streams past the cap, to Ollama's check
                assert r.status == 400
                assert (await r.json())["error"].startswith("digest mismatch")
            else:
                assert r.status == 413
                assert "too large" in (await r.json())["error"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: cut off as it passes the cap
            for _ in range(MAX_BODY // 1024 + 2):
                yield b"y" * 1024

        async with s.post(f"{fleet.url}{path}", data=chunks()) as r:
            assert r.status == 413
    await _plain(fleet.url)


async def test_a_half_sent_body_is_cut_off_with_408(fleet: LocalFleet) -> None:
    head = b"POST /api/generate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 100\r\n\r\n" + b'{"model":'
    reader, writer = await _open(fleet.url, head)
    try:
        raw = await asyncio.wait_for(reader.read(), 10)  # the server closes the connection after it
    finally:
        writer.close()
    assert _status(raw) == 408
    assert b'"error"' in raw
    await _plain(fleet.url)


async def test_requests_beyond_the_limit_are_503_at_once(fleet: LocalFleet) -> None:
    assert fleet.gateway is not None
    head = b"POST /api/chat HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 100\r\n\r\n{"
    slow = [await _open(fleet.url, head) for _ in range(2)]  # two requests held reading their bodies
    try:
        await fleet.gateway.edge.wait_active(2, timeout=10)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{fleet.url}/api/generate", json={"model": MODEL, "prompt": "hi"}) as r:
                assert r.status == 503
                assert (await r.json())["error"].startswith("server busy")
            async with s.get(f"{fleet.url}/api/tags") as r:  # the views are not counted
                assert r.status == 200
        for reader, _ in slow:
            assert _status(await asyncio.wait_for(reader.read(), 10)) == 408
    finally:
        for _, writer in slow:
            writer.close()
    assert fleet.gateway.edge.active == 0
    await _plain(fleet.url)


def _padded(size: int) -> bytes:
    """A generate body of exactly ``size`` bytes."""
    head, tail = b'{"model": "llama3.2", "stream": false, "options": {"num_predict": 1}, "prompt": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_bodies_held_together_stay_within_their_budget(fleet: LocalFleet) -> None:
    assert fleet.gateway is not None
    edge = fleet.gateway.edge
    big = 60 * 1024
    # a declared length alone holds nothing: idle connections cannot block everyone else
    declared = f"POST /api/chat HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {MAX_BODY}\r\n\r\n"
    _, idle = await _open(fleet.url, declared.encode())
    await edge.wait_active(1, timeout=10)
    assert edge.held == 0
    idle.close()
    head = f"POST /api/generate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {big}\r\n\r\n".encode()
    sent = big - 10  # what it sent before it stalls: what it holds
    reader, writer = await _open(fleet.url, head + _padded(big)[:sent])
    try:
        await edge.wait_held(sent, timeout=10)  # the server read what was sent
        assert edge.held == sent
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{fleet.url}/api/generate", data=_padded(big)) as r:  # would pass it
                assert r.status == 503 and (await r.json())["error"].startswith("server busy")

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused as it passes it
                for _ in range(50):
                    yield b" " * 1024

            async with s.post(f"{fleet.url}/api/generate", data=chunks()) as r:
                assert r.status == 503
            async with s.post(f"{fleet.url}/api/generate", data=_padded(4 * 1024)) as r:  # fits
                assert r.status == 200, await r.text()
        assert _status(await asyncio.wait_for(reader.read(), 10)) == 408  # the slow one ends
    finally:
        writer.close()
    await edge.wait_idle(timeout=10)
    assert edge.held == 0  # every body's share given back
    async with aiohttp.ClientSession() as s, s.post(f"{fleet.url}/api/generate", data=_padded(big)) as r:
        assert r.status == 200, await r.text()
