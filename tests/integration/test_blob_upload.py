"""Blob uploads stream through the gateway and the agent into Ollama, past the body cap, chunk by
chunk: a real nats-server, a real gateway socket, the simulator's digest check."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import ollama
import pytest
from corral.protocol.envelope import HEADER_HEADROOM
from corral.protocol.names import parse_name
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.integration

MODEL = "llama3.2"
MAX_BODY = 64 * 1024
STALL_S = 1.0
PIECE = 64 * 1024
BLOB = os.urandom(5 * 1024 * 1024)  # 80 times the cap, five NATS chunks and more
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
STALLED = "sha256:" + hashlib.sha256(BLOB[:-1]).hexdigest()  # a blob no test completes


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="blobupload",
        sims=default_sims(1, time_scale=0.01),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={"queue_timeout_s": 5.0, "max_body_bytes": MAX_BODY, "body_timeout_s": STALL_S},
        registry=None,
        aggregator=None,
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


def _transport(fleet: LocalFleet) -> Any:
    assert fleet.gateway is not None
    return fleet.gateway.planner.transport


async def _settled(fleet: LocalFleet) -> None:
    """Every request has ended at the gateway, and the upload left nothing behind."""
    assert fleet.gateway is not None
    await fleet.gateway.edge.wait_idle(timeout=10)
    transport = _transport(fleet)
    assert transport.in_flight == 0
    assert transport.bodies_streaming == 0
    assert transport.bodies_held == 0


async def test_a_blob_far_over_the_cap_streams_holding_one_chunk_and_creates_a_model(
    fleet: LocalFleet,
) -> None:
    assert fleet.gateway is not None and fleet.gateway.nc is not None
    transport = _transport(fleet)
    chunk = fleet.gateway.nc.max_payload - HEADER_HEADROOM
    assert len(BLOB) > 4 * chunk and len(BLOB) > 50 * MAX_BODY
    go, sent = asyncio.Event(), asyncio.Event()
    peak, streaming = 0, 0

    async def slow() -> AsyncIterator[bytes]:  # one piece each time the test says so
        for at in range(0, len(BLOB), PIECE):
            await go.wait()
            go.clear()
            yield BLOB[at : at + PIECE]
            sent.set()

    async def drive() -> None:
        nonlocal peak, streaming
        for _ in range(0, len(BLOB), PIECE):
            go.set()
            await sent.wait()
            sent.clear()
            peak = max(peak, transport.bodies_held)
            streaming = max(streaming, transport.bodies_streaming)

    async with aiohttp.ClientSession() as s:
        driver = asyncio.create_task(drive())
        headers = {"Content-Length": str(len(BLOB))}
        async with s.post(f"{fleet.url}/api/blobs/{DIGEST}", data=slow(), headers=headers) as r:
            assert r.status == 201, await r.text()
        await asyncio.wait_for(driver, 10)
        async with s.head(f"{fleet.url}/api/blobs/{DIGEST}") as r:
            assert r.status == 200
    assert streaming == 1  # it went as a streamed body ...
    assert 0 < peak <= chunk + 4 * PIECE  # ... of which the gateway held about one chunk at a time
    assert fleet.sims[0].ctx.catalog.blobs[DIGEST] == BLOB  # Ollama got every byte, in order
    async with ollama.AsyncClient(host=fleet.url) as c:
        r2 = await c.create(model="fromblob", files={"model.gguf": DIGEST})
        assert r2.status == "success"
    assert parse_name("fromblob").key in fleet.sims[0].ctx.catalog.models  # made from the blob
    await _settled(fleet)


async def test_a_wrong_digest_is_ollamas_400(fleet: LocalFleet) -> None:
    data = BLOB[: 3 * MAX_BODY]
    wrong = "sha256:" + "b" * 64
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fleet.url}/api/blobs/{wrong}", data=data) as r:
            assert r.status == 400
            assert (await r.json())["error"] == (
                f'digest mismatch, expected "{wrong}", got "sha256:{hashlib.sha256(data).hexdigest()}"'
            )
    assert wrong not in fleet.sims[0].ctx.catalog.blobs
    await _settled(fleet)


async def _open(url: str, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(head)
    await writer.drain()
    return reader, writer


def _upload_head(digest: str, size: int) -> bytes:
    return f"POST /api/blobs/{digest} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {size}\r\n\r\n".encode()


async def test_a_client_that_stalls_mid_upload_gets_408_and_nothing_stays(fleet: LocalFleet) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await _open(fleet.url, _upload_head(STALLED, len(BLOB)) + BLOB[: 3 * PIECE])
    try:
        started = loop.time()
        raw = await asyncio.wait_for(reader.read(), 10)  # the server closes the connection after it
        waited = loop.time() - started
    finally:
        writer.close()
    assert raw.split(b"\r\n", 1)[0].split()[1] == b"408", raw
    assert b"stalled" in raw
    assert waited < STALL_S + 5  # the stall timeout, not the blob's size, bounds it
    await _settled(fleet)
    assert STALLED not in fleet.sims[0].ctx.catalog.blobs


async def test_a_client_that_goes_away_mid_upload_releases_everything(fleet: LocalFleet) -> None:
    assert fleet.gateway is not None
    wrong = "sha256:" + "c" * 64
    _, writer = await _open(fleet.url, _upload_head(wrong, len(BLOB)) + BLOB[: 3 * PIECE])
    await fleet.gateway.edge.wait_active(1, timeout=10)
    writer.close()
    await writer.wait_closed()
    await _settled(fleet)
    assert wrong not in fleet.sims[0].ctx.catalog.blobs


@pytest.mark.parametrize(
    ("sent", "word"), [(PIECE // 2, b"shorter"), (2 * PIECE, b"longer")], ids=["short", "long"]
)
async def test_a_body_other_than_its_content_length_is_400(fleet: LocalFleet, sent: int, word: bytes) -> None:
    """The ASGI contract does not promise the server checks the length: the gateway does."""
    assert fleet.gateway is not None
    declared = PIECE
    body = [
        {"type": "http.request", "body": BLOB[: sent // 2], "more_body": True},
        {"type": "http.request", "body": BLOB[sent // 2 : sent], "more_body": False},
    ]
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if body:
            return body.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    out: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        out.append(msg)

    path = f"/api/blobs/{DIGEST}"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-length", str(declared).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    try:
        await asyncio.wait_for(fleet.gateway(scope, receive, send), 10)
    finally:
        gone.set()
    assert out[0]["type"] == "http.response.start" and out[0]["status"] == 400
    assert word in out[1]["body"]
    await _settled(fleet)
