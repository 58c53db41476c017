"""Ollama model names: parsing, display form, matching, vendor pins, subject tokens."""

from __future__ import annotations

import re

import pytest
from corral.protocol.errors import BadRequest, InvalidModelName
from corral.protocol.names import (
    DEFAULT_HOST,
    DEFAULT_NAMESPACE,
    DEFAULT_TAG,
    MAX_NAME_LENGTH,
    ModelName,
    decode_token,
    encode_token,
    is_token,
    parse_name,
    split_vendor_pin,
)
from hypothesis import given, settings
from hypothesis import strategies as st

# Deterministic and modest: the same examples every run, no example database on disk.
PROPERTY = settings(max_examples=200, derandomize=True, database=None, deadline=None)

TOKEN_CHARS = re.compile(r"[a-z0-9_/=A-F-]+")
KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")

# -- Ollama's own examples ------------------------------------------------------------------


def test_bare_model_gets_every_default() -> None:
    n = parse_name("llama3.2")
    assert n == ModelName(host=DEFAULT_HOST, namespace=DEFAULT_NAMESPACE, model="llama3.2", tag=DEFAULT_TAG)
    assert n.canonical == "registry.ollama.ai/library/llama3.2:latest"
    assert n.display == "llama3.2:latest"
    assert n.key == "llama3.2:latest"


def test_namespace_and_tag() -> None:
    n = parse_name("mattw/pyg:7b")
    assert (n.host, n.namespace, n.model, n.tag) == ("registry.ollama.ai", "mattw", "pyg", "7b")
    assert n.canonical == "registry.ollama.ai/mattw/pyg:7b"
    assert n.display == "mattw/pyg:7b"


def test_hugging_face_name_keeps_host_in_display_and_case_in_parts() -> None:
    n = parse_name("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M")
    assert (n.host, n.namespace, n.model, n.tag) == (
        "hf.co",
        "bartowski",
        "Llama-3.2-1B-Instruct-GGUF",
        "Q4_K_M",
    )
    assert n.display == "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"
    assert n.canonical == n.display
    assert n.key == "hf.co/bartowski/llama-3.2-1b-instruct-gguf:q4_k_m"
    assert n.token == "hf=2Eco/bartowski/llama-3=2E2-1b-instruct-gguf=3Aq4_k_m"


def test_latest_is_never_dropped_from_display() -> None:
    assert parse_name("library/llama3.2:latest").display == "llama3.2:latest"
    assert parse_name("mattw/pyg").display == "mattw/pyg:latest"


def test_default_host_with_other_namespace_shows_namespace_only() -> None:
    assert parse_name("registry.ollama.ai/mattw/pyg:7b").display == "mattw/pyg:7b"


def test_other_host_with_default_namespace_shows_everything() -> None:
    assert parse_name("example.com/library/x:1").display == "example.com/library/x:1"


def test_host_with_port_and_scheme() -> None:
    n = parse_name("https://localhost:5000/team/model:v1.2")
    assert (n.host, n.namespace, n.model, n.tag) == ("localhost:5000", "team", "model", "v1.2")
    # A colon before the last slash is the port, not a tag.
    assert parse_name("localhost:5000/team/model").tag == "latest"


@pytest.mark.parametrize(
    "spelling",
    [
        "Llama3.2",
        "llama3.2",
        "llama3.2:latest",
        "LLAMA3.2:LATEST",
        "library/llama3.2:latest",
        "Library/Llama3.2",
        "registry.ollama.ai/library/llama3.2:latest",
        "Registry.Ollama.AI/LIBRARY/llama3.2",
    ],
)
def test_spellings_of_one_model_share_key_and_token(spelling: str) -> None:
    n = parse_name(spelling)
    assert n.key == "llama3.2:latest"
    assert n.token == "llama3=2E2=3Alatest"


def test_different_models_have_different_keys() -> None:
    keys = {parse_name(s).key for s in ("llama3.2", "llama3.2:1b", "mattw/llama3.2", "hf.co/mattw/llama3.2")}
    assert len(keys) == 4


# -- invalid names (Ollama answers 400 "invalid model name") ------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "foo:",  # empty tag implied by a separator
        "/foo",  # empty namespace
        "foo/",  # empty model
        "ns/foo:",
        "a/b/c/d",  # more than three parts
        "my.ns/model",  # '.' is not allowed in a namespace
        "hf.co/model",  # two parts: hf.co is a namespace here, and has a dot
        "x" * 81,  # a part over 80 characters
        "ns/" + "m" * 81,
        "m:" + "t" * 81,
        "x" * 351 + "/ns/m",  # host over 350 characters
        "-foo",  # bad first character
        ".foo",
        "foo:-bar",
        "foo:.bar",
        "-ns/foo",
        "foo bar",
        "foo*",
        "foo>",
        "foo:bar:baz",  # ':' only in host (and digest)
        "ns:x/model",  # ':' not allowed in a namespace
        "héllo",
        "foo@bar",
    ],
)
def test_invalid_names_raise(raw: str) -> None:
    with pytest.raises(InvalidModelName) as info:
        parse_name(raw)
    err = info.value
    assert isinstance(err, BadRequest)
    assert err.status == 400
    assert err.message == "invalid model name"
    assert err.name == raw


def test_length_limits_are_inclusive() -> None:
    assert parse_name("m" * 80).model == "m" * 80
    assert parse_name("n" * 80 + "/m:" + "t" * 80).tag == "t" * 80
    host = "h" * 350
    assert parse_name(host + "/ns/m").host == host


def test_underscore_first_and_dots_dashes_in_model_and_tag() -> None:
    n = parse_name("_ns/_my-model.v2:q4_0.gguf-x")
    assert (n.namespace, n.model, n.tag) == ("_ns", "_my-model.v2", "q4_0.gguf-x")


# -- tokens ------------------------------------------------------------------------------------


def test_token_example_from_the_style_guide() -> None:
    assert encode_token("llama3.2:latest") == "llama3=2E2=3Alatest"
    assert decode_token("llama3=2E2=3Alatest") == "llama3.2:latest"
    assert parse_name("llama3.2:latest").token == "llama3=2E2=3Alatest"


def test_escape_character_itself_is_escaped() -> None:
    assert encode_token("a=b") == "a=3Db"
    assert decode_token("a=3Db") == "a=b"


def test_non_ascii_is_escaped_per_utf8_byte() -> None:
    assert encode_token("é") == "=C3=A9"
    assert decode_token("=C3=A9") == "é"


@pytest.mark.parametrize(
    "bad",
    ["", "a.b", "a b", "a*", "a>", "A", "=3a", "=G1", "=3", "abc=", "llama3.2:latest", "a\tb"],
)
def test_non_tokens_are_rejected(bad: str) -> None:
    assert not is_token(bad)
    with pytest.raises(ValueError):
        decode_token(bad)


def test_escape_of_invalid_utf8_is_rejected() -> None:
    # token-shaped, but not the encoding of any string: a message naming it is refused at intake,
    # not admitted to fail later wherever the agent reads its model
    assert not is_token("=C3") and not is_token("a=FF")
    with pytest.raises(ValueError):
        decode_token("=C3")


def test_a_needless_escape_is_not_a_token() -> None:
    # "=61" decodes to "a", whose token is "a": one token per model, so one subject per model
    assert decode_token("=61") == "a" and not is_token("=61") and is_token("a")


# -- properties over names generated from the grammar ------------------------------------------

_FIRST = "[A-Za-z0-9_]"
hosts = st.from_regex(rf"{_FIRST}[A-Za-z0-9_.-]{{0,30}}(:[0-9]{{1,5}})?", fullmatch=True)
namespaces = st.from_regex(rf"{_FIRST}[A-Za-z0-9_-]{{0,79}}", fullmatch=True)
models = st.from_regex(rf"{_FIRST}[A-Za-z0-9_.-]{{0,79}}", fullmatch=True)
tags = st.from_regex(rf"{_FIRST}[A-Za-z0-9_.-]{{0,79}}", fullmatch=True)


@st.composite
def valid_names(draw: st.DrawFn) -> tuple[str, ModelName]:
    """A raw name and the parts it must parse into."""
    model = draw(models)
    tag = draw(st.none() | tags)
    namespace = draw(st.none() | namespaces)
    host = draw(st.none() | hosts) if namespace is not None else None
    scheme = draw(st.sampled_from(["", "https://", "http://"])) if host is not None else ""
    raw = model
    if namespace is not None:
        raw = f"{namespace}/{raw}"
    if host is not None:
        raw = f"{scheme}{host}/{raw}"
    if tag is not None:
        raw = f"{raw}:{tag}"
    expected = ModelName(
        host=host or DEFAULT_HOST,
        namespace=namespace or DEFAULT_NAMESPACE,
        model=model,
        tag=tag or DEFAULT_TAG,
    )
    return raw, expected


@PROPERTY
@given(valid_names())
def test_valid_names_parse_into_their_parts(case: tuple[str, ModelName]) -> None:
    raw, expected = case
    assert parse_name(raw) == expected


@PROPERTY
@given(valid_names())
def test_token_is_one_subject_token_and_kv_key_and_decodes_to_key(case: tuple[str, ModelName]) -> None:
    n = parse_name(case[0])
    token = n.token
    assert TOKEN_CHARS.fullmatch(token), token
    assert KV_KEY.fullmatch(token), token
    assert not set(token) & set(".*> \t\r\n")
    assert is_token(token)
    assert decode_token(token) == n.key


@PROPERTY
@given(valid_names())
def test_display_form_parses_to_the_same_key(case: tuple[str, ModelName]) -> None:
    n = parse_name(case[0])
    again = parse_name(n.display)
    assert again.key == n.key
    assert again.display == n.display
    assert parse_name(n.canonical).key == n.key


@PROPERTY
@given(valid_names())
def test_matching_ignores_case(case: tuple[str, ModelName]) -> None:
    raw = case[0]
    n = parse_name(raw)
    assert parse_name(raw.upper()).key == n.key
    assert parse_name(raw.lower()).token == n.token
    assert n.key == n.key.lower()


@PROPERTY
@given(st.text(min_size=1))
def test_encode_decode_round_trip(s: str) -> None:
    token = encode_token(s)
    assert TOKEN_CHARS.fullmatch(token)
    assert decode_token(token) == s


@PROPERTY
@given(st.text(min_size=1), st.text(min_size=1))
def test_encoding_is_injective(a: str, b: str) -> None:
    if a != b:
        assert encode_token(a) != encode_token(b)


def test_empty_string_encodes_to_no_token() -> None:
    # An empty subject token is not a subject; keys are never empty.
    assert encode_token("") == ""
    assert not is_token("")


# -- vendor pins -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("amd/llama3", ("amd", "llama3")),
        ("llama3@nvidia", ("nvidia", "llama3")),
        ("NVIDIA/llama3:8b", ("nvidia", "llama3:8b")),
        ("llama3:8b@AMD", ("amd", "llama3:8b")),
        ("cpu/hf.co/bartowski/x:Q4_K_M", ("cpu", "hf.co/bartowski/x:Q4_K_M")),
        ("apple/llama3", ("apple", "llama3")),
        ("intel/llama3", ("intel", "llama3")),
        ("library/llama3", (None, "library/llama3")),
        ("registry.ollama.ai/amd/x", (None, "registry.ollama.ai/amd/x")),
        ("llama3@foo", (None, "llama3@foo")),
        ("llama3", (None, "llama3")),
        ("any/llama3", (None, "any/llama3")),
        ("amd/", (None, "amd/")),
        ("@amd", (None, "@amd")),
        ("amdx/llama3", (None, "amdx/llama3")),
        ("", (None, "")),
    ],
)
def test_split_vendor_pin(raw: str, expected: tuple[str | None, str]) -> None:
    assert split_vendor_pin(raw) == expected


def test_pinned_remainder_is_a_plain_model_name() -> None:
    vendor, rest = split_vendor_pin("amd/mattw/pyg:7b")
    assert vendor == "amd"
    assert parse_name(rest).key == "mattw/pyg:7b"


@pytest.mark.parametrize(
    "raw",
    [
        "j" * 10_000 + "://llama3.2",  # a junk prefix is not ignored
        "ftp://llama3.2",
        "://llama3.2",
        "http:/" + "/" + "x" * 600,
        "llama3.2\r\n",
        "llama3.2\x00",
        "lla ma",
    ],
)
def test_hostile_names_are_invalid(raw: str) -> None:
    with pytest.raises(InvalidModelName):
        parse_name(raw)


def test_http_and_https_schemes_are_the_only_prefixes() -> None:
    assert parse_name("https://example.com/ns/m:t").key == "example.com/ns/m:t"
    assert parse_name("HTTP://example.com/ns/m:t").key == "example.com/ns/m:t"
    assert len("https://" + "h" * 350 + "/n/m:t") <= MAX_NAME_LENGTH
