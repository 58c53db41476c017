"""Readiness against a real nats-server: ready while it is up, not ready once it is gone, ready
again when it comes back on the same port; and the gateway's ``GET /ready`` saying the same."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from corral.gateway.app import Gateway
from corral.gateway.settings import GatewaySettings
from corral.runtime.health import not_ready
from corral.runtime.nats import connect
from corral.runtime.natsserver import NatsServer
from corral.runtime.process import AsgiServer

WITHIN_S = 10.0  # reconnects back off to at most 2 s: well within this


async def test_not_ready_says_why_while_nats_is_away(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "js")
    await server.start()
    reconnected = asyncio.Event()
    nc = await connect(server.url, name="health-test", on_reconnected=reconnected.set)
    try:
        assert await not_ready(nc, "corral_queue") is None
        await server.kill()
        # disconnected, or connected to nothing that answers: either way said within the timeout
        assert "NATS" in (await not_ready(nc, "corral_queue") or "")
        await server.start()
        await asyncio.wait_for(reconnected.wait(), WITHIN_S)
        assert await not_ready(nc, "corral_queue") is None
    finally:
        await nc.close()
        await server.stop()
    assert await not_ready(nc, "corral_queue") == "the NATS connection is closed"
    assert await not_ready(None, "corral_queue") is not None


async def test_gateway_ready_is_503_while_nats_is_away(tmp_path: Path, root: str) -> None:
    server = NatsServer(store_dir=tmp_path / "js")
    await server.start()
    gateway = Gateway(GatewaySettings(nats_url=server.url, root=root, port=0))
    http = AsgiServer(gateway, "127.0.0.1", 0)
    await http.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{http.url}/ready") as r:
                assert (r.status, await r.json()) == (200, {"status": "ready"})
            await server.kill()
            async with s.get(f"{http.url}/ready") as r:
                body = await r.json()
                assert (r.status, body["status"]) == (503, "not ready") and "NATS" in body["error"]
            async with s.get(f"{http.url}/") as r:  # liveness stays Ollama's answer
                assert (r.status, await r.text()) == (200, "Ollama is running")
            # back on NATS, the gateway opens its buckets again and its fleet watch re-syncs
            resynced = asyncio.create_task(gateway.fleet.wait_changed(WITHIN_S))
            await server.start()
            assert await resynced
            async with s.get(f"{http.url}/ready") as r:
                assert (r.status, await r.json()) == (200, {"status": "ready"})
    finally:
        await http.stop()
        await server.stop()
