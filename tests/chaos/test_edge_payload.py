"""Hostile requests at the HTTP edge never make the gateway publish more than the NATS server takes.

A NATS message over the server's max_payload closes the connection; the gateway must answer such a
request 400 (or split its body) and keep serving every request after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="edgepayload",
        sims=default_sims(1, time_scale=0.01),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={"queue_timeout_s": 5.0},
        registry=None,
        aggregator=None,
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


async def _plain(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(
        f"{url}/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False}
    ) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["done"] is True


def _padded_body(model: str, size: int) -> bytes:
    head = b'{"model": "' + model.encode() + b'", "stream": false, "prompt": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


async def test_junk_scheme_and_huge_tracestate_answer_400_and_the_next_request_is_served(
    fleet: LocalFleet,
) -> None:
    assert fleet.gateway is not None and fleet.gateway.nc is not None
    limit = fleet.gateway.nc.max_payload
    hostile = "j" * 10_000 + "://" + MODEL + "@nvidia"
    body = _padded_body(hostile, limit - 8 * 1024 - 1)
    headers = {
        "content-type": "application/json",
        "traceparent": TRACEPARENT,
        "tracestate": ",".join(f"k{i}=" + "v" * 250 for i in range(31)),
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fleet.url}/api/generate", data=body, headers=headers) as r:
            assert r.status == 400
            assert "error" in await r.json()
        await _plain(s, fleet.url)
    assert not fleet.gateway.nc.is_closed


async def test_a_body_just_under_the_split_with_big_valid_headers_is_served(fleet: LocalFleet) -> None:
    """A valid but long name (vendor pin: copied into two headers) plus the largest W3C tracestate:
    the body is still served (split, since headers count), and the connection stays up."""
    assert fleet.gateway is not None and fleet.gateway.nc is not None
    limit = fleet.gateway.nc.max_payload
    body = _padded_body(MODEL + "@nvidia", limit - 8 * 1024 - 1)
    headers = {
        "content-type": "application/json",
        "traceparent": TRACEPARENT,
        "tracestate": "k=" + "v" * 250 + ",l=" + "w" * 250,
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fleet.url}/api/generate", data=body, headers=headers) as r:
            assert r.status == 200, await r.text()
        await _plain(s, fleet.url)
    assert not fleet.gateway.nc.is_closed


@pytest.mark.parametrize(
    "tracestate",
    ["a=" + "b" * 600, "not a tracestate\x7f", ",".join(f"k{i}=v" for i in range(40))],
)
async def test_malformed_or_oversized_trace_context_is_not_forwarded(
    fleet: LocalFleet, tracestate: str
) -> None:
    from corral.gateway.app import trace_carrier

    carrier = trace_carrier([(b"traceparent", TRACEPARENT.encode()), (b"tracestate", tracestate.encode())])
    assert carrier == {"traceparent": TRACEPARENT}
    assert trace_carrier([(b"traceparent", b"00-zz-1"), (b"tracestate", b"a=b")]) == {}


async def test_a_blob_digest_that_is_not_one_is_400_before_any_publish(fleet: LocalFleet) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fleet.url}/api/blobs/sha256:{'a' * 20_000}", data=b"x") as r:
            assert r.status == 400
            assert await r.json() == {"error": "invalid digest format"}
        async with s.head(f"{fleet.url}/api/blobs/{'%0d%0a' * 10}") as r:
            assert r.status == 400
        await _plain(s, fleet.url)


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/api/generate", [(b"x-load-balancing-strategy", b"\xff\xfe")]),
        ("/api/chat", [(b"x-corral-session", b"caf\xe9")]),
        ("/api/generate", [(b"x-enforce-strategy", b"\x80")]),
        ("/api/pull", [(b"x-corral-replicas", "²".encode("latin-1"))]),  # int() takes it
        ("/api/pull", [(b"x-corral-vendor", b"\xff")]),
    ],
)
async def test_odd_header_bytes_are_400_not_500(
    fleet: LocalFleet, path: str, headers: list[tuple[bytes, bytes]]
) -> None:
    body = b'{"model": "llama3.2", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}'
    status, reply = await _raw_post(fleet.url, path, body, headers)
    assert status == 400, reply
    assert b'"error"' in reply
    async with aiohttp.ClientSession() as s:
        await _plain(s, fleet.url)


async def _raw_post(
    url: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[int, bytes]:
    """One HTTP/1.1 POST written byte for byte (aiohttp will not send non-UTF-8 header values)."""
    import asyncio
    from urllib.parse import urlsplit

    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\nconnection: close\r\n"
        )
        writer.write(head.encode() + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_nats_client_neutralises_line_breaks_in_header_values(nats_server: NatsServer) -> None:
    """The pinned nats-py keeps a header value on its line: no value can smuggle a header."""
    import nats

    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("edge.crlf")
        await nc.publish("edge.crlf", b"", headers={"A": "x\r\nCorral-Model: evil", "B": "y\nZ: z"})
        msg = await sub.next_msg(timeout=5)
    finally:
        await nc.close()
    assert msg.headers is not None
    assert set(msg.headers) == {"A", "B"}
