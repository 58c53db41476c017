"""HTTPS on the gateway (``--tls-cert``/``--tls-key``) with a self-signed certificate that the client
trusts; and, with keys off, pulls (``/api/pull`` and auto-pull) only from allowed registries."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import ollama
import pytest
from corral.protocol.names import key_of
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import until

pytestmark = pytest.mark.integration


async def self_signed(tmp: Path) -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    proc = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return str(cert), str(key)


@pytest.fixture
async def fleet(nats_server: NatsServer, root: str, tmp_path: Path) -> AsyncIterator[LocalFleet]:
    cert, key = await self_signed(tmp_path)
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=0.01),
        gateway={"tls_cert": cert, "tls_key": key, "auto_pull": True},
    )
    async with LocalFleet(options) as f:
        yield f


async def test_https_with_a_trusted_self_signed_certificate(fleet: LocalFleet) -> None:
    assert fleet.url.startswith("https://")
    cert = fleet.gateway.settings.tls_cert  # type: ignore[union-attr]
    trusted = ssl.create_default_context(cafile=cert)
    async with ollama.AsyncClient(host=fleet.url, verify=trusted) as c:
        r = await c.generate(model="llama3.2", prompt="hi", options={"num_predict": 2})
        assert r.done and r.response
    async with httpx.AsyncClient() as untrusting:  # the system CAs do not know this certificate
        with pytest.raises(httpx.ConnectError):
            await untrusting.get(fleet.url + "/api/version")


async def test_pulls_only_from_allowed_registries_with_keys_off(fleet: LocalFleet) -> None:
    cert = fleet.gateway.settings.tls_cert  # type: ignore[union-attr]
    async with ollama.AsyncClient(host=fleet.url, verify=ssl.create_default_context(cafile=cert)) as c:
        with pytest.raises(ollama.ResponseError) as pulled:
            await c.pull("10.0.0.1:8080/library/x", insecure=True)
        with pytest.raises(ollama.ResponseError) as auto:  # auto-pull is on: the same rule
            await c.generate(model="evil.example/library/x", prompt="hi")
        with pytest.raises(ollama.ResponseError) as unknown:  # an allowed registry: pulled, not found
            await c.generate(model="hf.co/nobody/nothing", prompt="hi")
    assert pulled.value.status_code == auto.value.status_code == 400
    assert "registry '10.0.0.1:8080' is not allowed" in pulled.value.error
    assert "registry 'evil.example' is not allowed" in auto.value.error
    assert unknown.value.status_code == 404


async def test_push_and_create_reach_only_allowed_registries(fleet: LocalFleet) -> None:
    """The agents hold the rule too (they are the ones that fetch and send), so it covers push and
    create, and any sender: a model copied under a foreign host cannot be pushed there."""
    cert = fleet.gateway.settings.tls_cert  # type: ignore[union-attr]
    async with ollama.AsyncClient(host=fleet.url, verify=ssl.create_default_context(cafile=cert)) as c:
        await c.pull("llama3.2")
        await c.copy("llama3.2", "evil.example/library/stolen")
        view = fleet.gateway.fleet  # type: ignore[union-attr]
        await until(fleet, lambda: bool(view.with_model(key_of("evil.example/library/stolen") or "")))
        with pytest.raises(ollama.ResponseError) as pushed:
            await c.push("evil.example/library/stolen", insecure=True)
        with pytest.raises(ollama.ResponseError) as created:
            await c.create("mine", from_="evil.example/library/other")
    for refused in (pushed.value, created.value):
        assert refused.status_code == 400
        assert "registry 'evil.example' is not allowed" in refused.error
