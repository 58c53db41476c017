"""Ollama's gate for browsers, on a real gateway socket: a Host that is not local is refused by a
gateway listening on loopback, an Origin that is not allowed is refused, an allowed one gets CORS
headers and its preflight 204, ``CORRAL_ORIGINS`` widens the list; clients that send no Origin
pass untouched. (The console's page and a page of another origin in a real browser:
``test_console.py``.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.integration

MODEL = "llama3.2"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="gate",
        sims=default_sims(1, time_scale=0.0),
        gateway={"origins": "https://*.example.com"},
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.mark.parametrize("host", ["evil.com", "evil.com:11434", "192.0.2.1:11434", "localhost.evil.com"])
async def test_a_loopback_gateway_refuses_a_host_that_is_not_local(
    fleet: LocalFleet, http: aiohttp.ClientSession, host: str
) -> None:
    for method, path, body in (("GET", "/api/tags", None), ("POST", "/api/chat", CHAT)):
        async with http.request(method, fleet.url + path, json=body, headers={"Host": host}) as r:
            assert r.status == 403 and await r.read() == b""


@pytest.mark.parametrize("host", ["localhost:11434", "127.0.0.1", "gw.internal", "[::1]:11434"])
async def test_local_hosts_and_clients_without_an_origin_are_served_as_before(
    fleet: LocalFleet, http: aiohttp.ClientSession, host: str
) -> None:
    async with http.post(fleet.url + "/api/chat", json=CHAT, headers={"Host": host}) as r:
        assert r.status == 200 and (await r.json())["done"]
        assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("origin", ["http://evil.com", "http://127.0.0.2:8080", "https://example.com"])
async def test_an_origin_that_is_not_allowed_is_refused_before_anything_runs(
    fleet: LocalFleet, http: aiohttp.ClientSession, origin: str
) -> None:
    sims = fleet.sims
    before = sum(s.stats.finished for s in sims)
    async with http.post(fleet.url + "/api/chat", json=CHAT, headers={"Origin": origin}) as r:
        assert r.status == 403 and await r.read() == b""
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    async with http.options(fleet.url + "/api/chat", headers=preflight) as r:
        assert r.status == 403
    assert sum(s.stats.finished for s in sims) == before  # nothing reached a model


@pytest.mark.parametrize(
    "origin", ["http://localhost:3000", "app://ollama", "https://chat.example.com", "vscode-webview://x"]
)
async def test_an_allowed_origin_gets_cors_headers_and_its_preflight_answered(
    fleet: LocalFleet, http: aiohttp.ClientSession, origin: str
) -> None:
    asked = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization,x-corral-priority",
    }
    async with http.options(fleet.url + "/api/chat", headers=asked) as r:
        assert r.status == 204
        assert r.headers["access-control-allow-origin"] == origin
        assert "POST" in r.headers["access-control-allow-methods"]
        # Ollama's fixed list and Corral's own headers, not an echo of whatever was asked
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {
            "content-type",
            "authorization",
            "x-corral-priority",
            "x-stainless-os",
            "traceparent",
        } <= allowed
        assert r.headers["access-control-max-age"] == "43200"
    asked["Access-Control-Request-Headers"] = "x-evil"
    async with http.options(fleet.url + "/api/chat", headers=asked) as r:
        assert "x-evil" not in r.headers["access-control-allow-headers"].lower()
    async with http.post(fleet.url + "/api/chat", json=CHAT, headers={"Origin": origin}) as r:
        assert r.status == 200 and (await r.json())["done"]
        assert r.headers["access-control-allow-origin"] == origin and r.headers["vary"] == "Origin"
    async with http.get(fleet.url + "/api/tags", headers={"Origin": origin}) as r:
        assert r.status == 200 and r.headers["access-control-allow-origin"] == origin
    async with http.post(fleet.url + "/api/chat", json={"model": "nope"}, headers={"Origin": origin}) as r:
        assert r.status == 404 and r.headers["access-control-allow-origin"] == origin  # errors readable too


async def test_an_options_request_is_answered_204_as_ollama_answers_it(
    fleet: LocalFleet, http: aiohttp.ClientSession
) -> None:
    """Ollama's CORS middleware takes any OPTIONS from an allowed origin for a preflight, and its host
    check answers an OPTIONS without one 204 on a loopback server; neither reaches a route."""
    origin = "http://localhost:3000"
    async with http.options(fleet.url + "/api/chat", headers={"Origin": origin}) as r:  # no method asked
        assert r.status == 204 and await r.read() == b""
        assert (
            r.headers["access-control-allow-origin"] == origin
            and "POST" in r.headers["access-control-allow-methods"]
        )
    for path in ("/api/chat", "/api/tags", "/v1/models", "/nowhere"):
        async with http.options(fleet.url + path) as r:
            assert r.status == 204 and await r.read() == b"", path
            assert "access-control-allow-origin" not in r.headers
    async with http.options(fleet.url + "/api/tags", headers={"Host": "evil.example.com"}) as r:
        assert r.status == 403  # the host check first, as before


async def test_the_gateways_own_origin_is_allowed_for_its_console(
    fleet: LocalFleet, http: aiohttp.ClientSession
) -> None:
    own = fleet.url.replace("127.0.0.1", "127.0.0.3")  # an address not in the default list
    host = own.split("://", 1)[1]
    async with http.get(fleet.url + "/api/tags", headers={"Origin": own, "Host": host}) as r:
        assert r.status == 200 and r.headers["access-control-allow-origin"] == own
    async with http.get(fleet.url + "/api/tags", headers={"Origin": own}) as r:
        assert r.status == 403  # the same origin, but the request reached another host


async def test_corral_origins_star_allows_every_origin(nats_server: NatsServer) -> None:
    options = FleetOptions(
        port=0, nats_url=nats_server.url, root="gatestar", sims=[], gateway={"origins": "*"}
    )
    async with LocalFleet(options) as f, aiohttp.ClientSession() as http:
        async with http.get(f.url + "/api/tags", headers={"Origin": "https://any.example.org"}) as r:
            assert r.status == 200 and r.headers["access-control-allow-origin"] == "*"
