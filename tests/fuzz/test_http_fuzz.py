"""Malformed requests across every endpoint the gateway serves, against one real fleet.

No answer may be a 5xx that Ollama itself would not give (502/503 from a fleet that is busy or
down are fine, 500 never is), no log record may carry a traceback, and afterwards the gateway
still serves a plain request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
from corral.protocol.endpoints import MODEL_ENDPOINTS
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.fuzz.logs import Tracebacks, capturing_tracebacks
from tests.integration.fleet_helpers import preload

pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")]

MODEL = "llama3.2"
ALLOWED_5XX = {502, 503}
URLS: dict[str, str] = {}  # "gateway", and "ollama": the fleet's one simulated Ollama (a 500 is compared)
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def tracebacks() -> Iterator[Tracebacks]:
    with capturing_tracebacks() as handler:
        yield handler


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer, tracebacks: Tracebacks) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root="fuzz",
        sims=default_sims(1, time_scale=0.001),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={"queue_timeout_s": 1.0, "max_body_bytes": 256 * 1024, "body_timeout_s": 5.0},
        registry=None,
        aggregator=None,
        log_level="WARNING",
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        URLS.update(gateway=f.url, ollama=f.sims[0].url)
        yield f
    assert not tracebacks.records, [r.getMessage() for r in tracebacks.records]


@pytest.fixture(scope="module")
async def http(fleet: LocalFleet) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False) as s:
        yield s


MANAGEMENT = frozenset({"/api/pull", "/api/delete", "/api/copy", "/api/create"})
READ_ONLY = ["/api/generate", "/api/chat", "/api/embed", "/api/show", "/api/push"]
PATHS = sorted(MODEL_ENDPOINTS) + [
    "/",
    "/api/version",
    "/api/tags",
    "/api/ps",
    "/api/status",
    "/v1/models",
    "/api/show",
    "/api/push",
    "/api/pull",
    "/api/create",
    "/api/delete",
    "/api/copy",
]
# a header value aiohttp will send: latin-1 text without line breaks
_header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80
)
_odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", " ", "\x00", "é" * 300, "a" * 20_000, "x://y", "ftp://llama3.2", "sha256:", "../.."]
    ),
    st.sampled_from(["llama3.2@nvidia", "amd/llama3.2", "junk" * 300 + "://llama3.2", "LLAMA3.2:LATEST"]),
)
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _odd_text)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_odd_text, inner, max_size=4)),
    max_leaves=12,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(_json, st.sampled_from([MODEL, "all-minilm", "nope:latest"])),
        "name": _json,
        "prompt": _json,
        "messages": st.one_of(
            _json, st.lists(st.fixed_dictionaries({}, optional={"role": _json, "content": _json}), max_size=3)
        ),
        "stream": _json,
        # odd spellings and types, and lengths past any calendar
        "keep_alive": st.one_of(
            st.sampled_from([0, "0", "0s", "-1m", "5m", "1h2x", None, True, [], {}, "", "x" * 300, 1e300]),
            st.integers(-(10**6), 10**6),
            st.integers(10**12, 10**40),
        ),
        "options": st.one_of(
            _json, st.fixed_dictionaries({}, optional={"num_ctx": _json, "num_predict": st.just(2)})
        ),
        "input": _json,
        "source": _json,
        "destination": _json,
    },
)
_bodies = st.one_of(
    _fields.map(msgspec.json.encode),
    _json.map(msgspec.json.encode),
    st.binary(max_size=200),
    st.sampled_from(
        [b"", b"{", b"\xff\xfe{}", b"null", b"[]", b'{"model":', '{"model":"ü"}'.encode("utf-16")]
    ),
)
_headers = st.dictionaries(
    st.sampled_from(
        [
            "x-load-balancing-strategy",
            "x-enforce-strategy",
            "x-corral-session",
            "x-corral-replicas",
            "x-corral-vendor",
            "traceparent",
            "tracestate",
            "content-type",
            "content-encoding",
            "accept",
        ]
    ),
    _header_text,
    max_size=4,
)


async def _check(
    http: aiohttp.ClientSession, method: str, path: str, body: bytes, headers: dict[str, str]
) -> None:
    async with http.request(method, URLS["gateway"] + path, data=body, headers=headers) as r:
        await r.read()
        status = r.status
    if status == 500:  # Ollama answers some wrong bodies 500 itself: fine when one Ollama does too
        async with http.request(method, URLS["ollama"] + path, data=body, headers=headers) as direct:
            await direct.read()
            assert direct.status == 500, (method, path, body[:200], headers, "500 from the gateway only")
        return
    assert status < 500 or status in ALLOWED_5XX, (method, path, status, body[:200], headers)


@FUZZ
@given(path=st.sampled_from(sorted(MODEL_ENDPOINTS)), body=_bodies, headers=_headers)
async def test_model_endpoints(
    http: aiohttp.ClientSession, path: str, body: bytes, headers: dict[str, str]
) -> None:
    await _check(http, "POST", path, body, headers)


@FUZZ
@given(path=st.sampled_from(READ_ONLY), fields=_fields, headers=_headers)
async def test_json_shaped_bodies(
    http: aiohttp.ClientSession, path: str, fields: dict[str, Any], headers: dict[str, str]
) -> None:
    await _check(http, "POST", path, msgspec.json.encode(fields), headers)


@FUZZ
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    path=st.sampled_from(PATHS),
    body=_bodies,
    headers=_headers,
)
async def test_every_endpoint_and_method(
    http: aiohttp.ClientSession, method: str, path: str, body: bytes, headers: dict[str, str]
) -> None:
    # the other tests need the model: a management call that names it (in any case: Ollama's names
    # are case-insensitive) may delete or replace it
    assume(path not in MANAGEMENT or MODEL.encode() not in body.lower())
    await _check(http, method, path, body, headers)


@FUZZ
@given(
    path=st.one_of(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#%"), max_size=80),
        st.sampled_from(
            ["sha256:" + "a" * 64, "sha256-" + "A" * 64, "sha256:" + "a" * 5000, "%00", "%0d%0a"]
        ),
    ),
    method=st.sampled_from(["HEAD", "POST"]),
    body=st.binary(max_size=100),
)
async def test_blob_digests_and_model_paths(
    http: aiohttp.ClientSession, path: str, method: str, body: bytes
) -> None:
    await _check(http, method, "/api/blobs/" + path, body, {})
    await _check(http, "GET", "/v1/models/" + path, b"", {})


@FUZZ
@given(
    path=st.sampled_from(sorted(MANAGEMENT)),
    # never the model the other tests need, in any spelling (`LLAMA3.2:LATEST` deletes it too)
    fields=_fields.filter(lambda f: MODEL.encode() not in msgspec.json.encode(f).lower()),
    headers=_headers,
)
async def test_management_bodies(
    http: aiohttp.ClientSession, path: str, fields: dict[str, Any], headers: dict[str, str]
) -> None:
    method = "DELETE" if path == "/api/delete" else "POST"
    await _check(http, method, path, msgspec.json.encode(fields), headers)


@FUZZ
@given(
    size=st.sampled_from([0, 1, 255 * 1024, 256 * 1024, 256 * 1024 + 1, 400 * 1024]),
    path=st.sampled_from(PATHS),
)
async def test_huge_and_empty_bodies(http: aiohttp.ClientSession, size: int, path: str) -> None:
    await _check(http, "POST", path, b"{" + b" " * max(size - 2, 0) + b"}" if size else b"", {})


async def test_the_gateway_still_serves_a_plain_request(
    http: aiohttp.ClientSession, fleet: LocalFleet
) -> None:
    async with http.post(
        f"{fleet.url}/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False}
    ) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["done"] is True
    assert fleet.gateway is not None and fleet.gateway.nc is not None and not fleet.gateway.nc.is_closed
