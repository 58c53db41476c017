"""The request envelope: headers round-trip through the typed value, and every malformed header is a
`BadEnvelope` (answered ``bad_request``), never another exception."""

from __future__ import annotations

import pytest
from corral.protocol import headers as H
from corral.protocol.envelope import (
    HEADER_HEADROOM,
    BadEnvelope,
    RequestEnvelope,
    decode_request,
    fits,
    header_size,
    trace_context,
)
from corral.protocol.errors import BadRequest
from corral.protocol.names import encode_token
from hypothesis import given
from hypothesis import strategies as st

_rid = st.text("abcdef0123456789-_", min_size=1, max_size=64)
_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=60)
_endpoints = st.sampled_from(["/api/generate", "/api/chat", "/v1/chat/completions", "/api/tags"])


@given(
    rid=_rid,
    endpoint=_endpoints,
    deadline=st.integers(0, 1 << 50),
    model=st.none() | st.sampled_from(["llama3.2:latest", "hf.co/u/r:q4", "a b c"]).map(encode_token),
    method=st.sampled_from(["POST", "GET", "DELETE", "HEAD"]),
    pin=st.none() | st.tuples(_names, _names),
    large=st.none() | st.tuples(st.integers(1, 1 << 30), _rid | _rid.map(lambda r: "registry." + r)),
    num_ctx=st.integers(0, 1 << 20),
    unload=st.booleans(),
    keep_alive=st.booleans(),
    expires_now=st.booleans(),
    now=st.booleans(),
    stream=st.booleans(),
)
def test_round_trip(
    rid: str,
    endpoint: str,
    deadline: int,
    model: str | None,
    method: str,
    pin: tuple[str, str] | None,
    large: tuple[int, str] | None,
    num_ctx: int,
    unload: bool,
    keep_alive: bool,
    expires_now: bool,
    now: bool,
    stream: bool,
) -> None:
    env = RequestEnvelope(
        rid=rid,
        endpoint=endpoint,
        deadline_ms=deadline,
        model=model,
        method=method,
        echo_model=pin[0] if pin else None,
        upstream_model=pin[1] if pin else None,
        body_size=large[0] if large else None,
        origin=large[1] if large else None,
        num_ctx=num_ctx,
        unload=unload,
        keep_alive=keep_alive or expires_now,  # a zero keep_alive is one named
        expires_now=expires_now,
        now=now,
        stream=stream,
        reply="corral.reply.gw.1" if unload else None,
        trace={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )
    assert decode_request(env.headers()) == env


def test_defaults_stay_off_the_wire() -> None:
    h = RequestEnvelope(rid="1", endpoint="/api/chat").headers()
    assert h == {H.REQUEST: "1", H.ENDPOINT: "/api/chat"}


GOOD = {H.REQUEST: "a1", H.ENDPOINT: "/api/generate"}


@pytest.mark.parametrize(
    "bad",
    [
        {H.REQUEST: ""},
        {H.REQUEST: "a.b"},  # would change the reply subject's shape
        {H.REQUEST: "x" * 65},
        {H.ENDPOINT: "/admin"},
        {H.ENDPOINT: "/api/../x"},
        {H.ENDPOINT: ""},
        {H.METHOD: "PATCH"},
        {H.MODEL: "Llama.3"},  # not a token: upper case and a dot
        {H.MODEL: "llama=FF"},  # token-shaped, but its escape is not UTF-8: no model's token
        {H.DEADLINE: "soon"},
        {H.DEADLINE: "-1"},
        {H.DEADLINE: "١٢"},  # Arabic-Indic digits: isdigit() but not ASCII
        {H.NUM_CTX: "4k"},
        {H.NUM_CTX: str(1 << 30)},
        {H.BODY_SIZE: "0", H.ORIGIN: "gw"},
        {H.BODY_SIZE: "100"},  # no origin to fetch it from
        {H.BODY_SIZE: "100", H.ORIGIN: "gw.x"},  # two tokens are a registry copy's only
        {H.BODY_SIZE: "100", H.ORIGIN: "registry.x.y"},
        {H.BODY_SIZE: "100", H.ORIGIN: "registry." + "x" * 200},
        {H.ECHO_MODEL: "amd/llama3"},  # without its upstream pair
        {H.REPLY: "corral.reply.>"},  # a wildcard would fan the reply out
        {H.REPLY: "a b"},
        {H.REPLY: "x" * 300},
        {H.ECHO_MODEL: "x" * 600, H.UPSTREAM_MODEL: "llama3"},
    ],
)
def test_malformed_headers_are_bad_requests(bad: dict[str, str]) -> None:
    with pytest.raises(BadEnvelope) as e:
        decode_request({**GOOD, **bad})
    assert isinstance(e.value, BadRequest) and e.value.code == "bad_request"


def test_no_headers_at_all() -> None:
    with pytest.raises(BadEnvelope):
        decode_request(None)


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_oversized_trace_context_is_dropped_not_forwarded() -> None:
    env = decode_request({**GOOD, H.TRACESTATE: "k=" + "v" * 8000, H.TRACEPARENT: TRACEPARENT})
    assert env.trace == {H.TRACEPARENT: TRACEPARENT}
    env = decode_request({**GOOD, H.TRACESTATE: "k=v", H.TRACEPARENT: "00-ab"})
    assert env.trace == {}


@pytest.mark.parametrize(
    "state",
    [
        "a=" + "b" * 511,  # over 512 characters
        ",".join(f"k{i}=v" for i in range(33)),  # over 32 members
        "k=v\r\nCorral-Model: x",  # no control characters
        "K=v",  # keys are lower case
        "k=v=w",
    ],
)
def test_malformed_tracestate_is_dropped_and_the_traceparent_kept(state: str) -> None:
    assert trace_context(TRACEPARENT, state) == {H.TRACEPARENT: TRACEPARENT}


@pytest.mark.parametrize(
    "parent",
    [
        TRACEPARENT[:-1],
        TRACEPARENT.upper(),
        "ff" + TRACEPARENT[2:],
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",
        TRACEPARENT + "\n",
        "x" * 8000,
    ],
)
def test_a_malformed_traceparent_drops_the_whole_context(parent: str) -> None:
    assert trace_context(parent, "k=v") == {}


def test_well_formed_trace_context_is_kept() -> None:
    state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7,tenant@vendor=x"
    assert trace_context(TRACEPARENT, state) == {H.TRACEPARENT: TRACEPARENT, H.TRACESTATE: state}


def test_size_counts_headers_against_max_payload() -> None:
    h = RequestEnvelope(rid="a1", endpoint="/api/generate", echo_model="x" * 500, upstream_model="y" * 500)
    size = header_size(h.headers())
    assert size > 1000
    limit = 64 * 1024
    room = limit - HEADER_HEADROOM - size
    assert fits(room, h.headers(), limit)
    assert not fits(room + 1, h.headers(), limit)
    assert header_size({"a": "é"}) == header_size({"a": "e"}) + 1  # bytes, not characters


_HEADER_NAMES = sorted(v for k, v in vars(H).items() if k.isupper() and isinstance(v, str))


@given(st.dictionaries(st.sampled_from(_HEADER_NAMES), st.text(max_size=30)))
def test_any_headers_decode_or_raise_bad_envelope(h: dict[str, str]) -> None:
    try:
        decode_request(h)
    except BadEnvelope:
        pass
