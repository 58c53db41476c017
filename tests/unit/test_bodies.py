"""The gateway's view of a request body: routing fields, unload detection, vendor-pin rewrite."""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest
from corral.gateway.bodies import (
    RouteView,
    decode_view,
    ends_runner,
    is_unload,
    keep_alive_is_zero,
    keep_alive_s,
    names_keep_alive,
    read_view,
    streams,
)
from corral.transport import model_work
from hypothesis import given, settings
from hypothesis import strategies as st

PROPERTY = settings(max_examples=200, derandomize=True, database=None, deadline=None)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def ka(value: Any) -> msgspec.Raw:
    """keep_alive exactly as it appears in a body."""
    return msgspec.Raw(json.dumps(value).encode())


def absent(raw: msgspec.Raw | None) -> bool:
    """An absent Raw field: None, or a JSON null placeholder."""
    return raw is None or bytes(raw) == b"null"


def view(**fields: Any) -> RouteView:
    """A view built directly, so is_unload is tested apart from decoding."""
    return RouteView(
        prompt=fields.get("prompt"),
        messages=None if "messages" not in fields else [ka(m) for m in fields["messages"]],
        keep_alive=None if fields.get("keep_alive") is None else ka(fields["keep_alive"]),
    )


# -- decode_view -------------------------------------------------------------------------------


def test_view_reads_only_routing_fields() -> None:
    raw = body(
        model="llama3.2",
        stream=False,
        keep_alive="5m",
        prompt="hi",
        options={"num_ctx": 4096, "temperature": 0.2},
        images=["aGVsbG8="],
        format={"type": "object"},
    )
    view = decode_view(raw)
    assert view.model == "llama3.2"
    assert view.stream is False
    assert bytes(view.keep_alive or b"") == b'"5m"'
    assert view.prompt == "hi"
    assert view.name is None
    assert view.messages is None
    assert absent(view.input)


def test_view_of_chat_keeps_messages_raw() -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": []}]
    view = decode_view(body(model="m", messages=msgs))
    assert view.messages is not None
    assert [json.loads(bytes(m)) for m in view.messages] == msgs


def test_view_name_alias() -> None:
    assert decode_view(b'{"name":"mattw/pyg:7b"}').name == "mattw/pyg:7b"


def test_empty_object_gives_an_empty_view() -> None:
    assert decode_view(b"{}") == RouteView()


def test_null_keep_alive_is_absent() -> None:
    assert not keep_alive_is_zero(decode_view(b'{"keep_alive":null}').keep_alive)


@pytest.mark.parametrize("value", [0, "0s", "5m", -1, 300.5, True, {"a": 1}])
def test_view_carries_any_keep_alive_verbatim(value: Any) -> None:
    raw = json.dumps(value).encode()
    view = decode_view(b'{"model":"m","keep_alive":' + raw + b"}")
    assert view.keep_alive is not None
    assert bytes(view.keep_alive) == raw


@pytest.mark.parametrize("value", ["hello", ["a", "b"], [], ""])
def test_view_carries_any_embed_input_verbatim(value: Any) -> None:
    raw = json.dumps(value).encode()
    view = decode_view(b'{"model":"all-minilm","input":' + raw + b"}")
    assert view.input is not None
    assert bytes(view.input) == raw


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"{", b"[1,2]", b'"model"', b'{"model":3}', b'{"stream":"yes"}']
)
def test_bad_bodies_raise_a_decode_error(raw: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_view(raw)


# -- keep_alive (Go durations, bare numbers as seconds) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [0, 0.0, -0.0, "0", "0s", "0m", "0h", "0ms", "0us", "0\u00b5s", "0ns", "0.0s", "-0", "-0s"],
)
def test_zero_keep_alive(value: Any) -> None:
    assert keep_alive_is_zero(ka(value)) is True


@pytest.mark.parametrize(
    "value",
    ["0m0s", "0h0m0s", "0s0ms", "0\u03bcs"],  # Go durations equal to zero (U+03BC is Go's other "µ")
)
def test_compound_and_greek_mu_zero_durations(value: str) -> None:
    assert keep_alive_is_zero(ka(value)) is True


@pytest.mark.parametrize(
    "value",
    [
        5,
        300,
        -1,
        0.5,
        "5m",
        "5m0s",
        "1h0m",
        "0.5s",
        "-1",
        "-1m",
        "300",
        True,
        False,
        None,
        {},
        [],
        [0],
        "",
        "abc",
    ],
)
def test_non_zero_keep_alive(value: Any) -> None:
    assert keep_alive_is_zero(ka(value)) is False


@pytest.mark.parametrize("value", ["0sm", "0hms", "0 s"])
def test_malformed_durations_are_not_zero(value: str) -> None:
    # Not Go durations: Ollama answers 400; the gateway must not turn them into an unload.
    assert keep_alive_is_zero(ka(value)) is False


@pytest.mark.parametrize("raw", [b"1e400", b"-1e400", b"1" + b"0" * 400])
def test_a_keep_alive_past_floats_range_is_not_zero_and_raises_nothing(raw: bytes) -> None:
    view = decode_view(b'{"model":"m","keep_alive":' + raw + b"}")
    assert keep_alive_is_zero(view.keep_alive) is False
    assert is_unload("/api/generate", view) is False  # Ollama words the 400


def test_a_body_names_a_keep_alive_when_it_gives_any_but_null() -> None:
    for value in (b'"5m"', b"0", b"-1", b'"0s"', b'"nonsense"'):
        assert names_keep_alive(decode_view(b'{"model":"m","keep_alive":' + value + b"}"))
    assert not names_keep_alive(decode_view(b'{"model":"m","keep_alive":null}'))
    assert not names_keep_alive(decode_view(b'{"model":"m"}'))


def test_a_body_that_is_not_utf8_is_read_as_go_reads_it() -> None:
    view = decode_view(b'{"model":"llama3.2","prompt":"a\xff\xfeb"}')
    assert view.model == "llama3.2" and view.prompt == "a\ufffd\ufffdb"
    with pytest.raises(msgspec.DecodeError):
        decode_view(b'{"model":"llama3.2","prompt":"a\xff')  # broken beyond its bytes: still an error


def test_a_body_go_reads_leniently_is_routed_and_sent_on_as_go_reads_it() -> None:
    """Ollama serves text after the JSON value and keys in other letter case; the gateway routes
    on them alike and sends on the body Ollama would have read, so whatever reads it next agrees."""
    plain = b'{"model":"llama3.2","stream":false}'
    assert read_view(plain) == (decode_view(plain), plain)  # the same bytes when nothing differs
    view, sent = read_view(b'{"model":"llama3.2","stream":false} \n{"x":1}')
    assert (view.model, view.stream) == ("llama3.2", False)
    assert msgspec.json.decode(sent) == {"model": "llama3.2", "stream": False}
    view, sent = read_view(b'{"Model":"llama3.2","STREAM":false,"Prompt":"hi","KEEP_ALIVE":"0s"}')
    assert (view.model, view.stream, view.prompt, keep_alive_is_zero(view.keep_alive)) == (
        "llama3.2",
        False,
        "hi",
        True,
    )
    assert msgspec.json.decode(sent) == {
        "model": "llama3.2",
        "stream": False,
        "prompt": "hi",
        "keep_alive": "0s",
    }
    # with the model spelt as its field, the others are still read as Go reads them: an unload
    # that says ``KEEP_ALIVE`` unloads, a generation that says ``PROMPT`` is no unload, and one that
    # says ``Stream: false`` is not streamed
    view, sent = read_view(b'{"model":"llama3.2","KEEP_ALIVE":0}')
    assert is_unload("/api/generate", view) and msgspec.json.decode(sent)["keep_alive"] == 0
    view, _ = read_view(b'{"model":"llama3.2","PROMPT":"hi","keep_alive":0}')
    assert view.prompt == "hi" and not is_unload("/api/generate", view)
    assert read_view(b'{"model":"llama3.2","prompt":"hi","Stream":false}')[0].stream is False
    nested = b'{"model":"x","format":{"properties":{"Name":{"type":"string"}}}}'
    assert read_view(nested)[1] is nested  # only the body's own keys are Go's fields
    with pytest.raises(msgspec.ValidationError):  # a folded field is typed as the field is
        read_view(b'{"Model":5}')
    raw = b'{"model":"llama3.2","prompt":"a\xff"}'
    assert read_view(raw)[1] is raw  # not UTF-8: sent on unchanged, Ollama reads it alike


def test_absent_keep_alive_is_not_zero() -> None:
    assert keep_alive_is_zero(None) is False
    assert keep_alive_is_zero(decode_view(b"{}").keep_alive) is False
    assert keep_alive_is_zero(msgspec.Raw(b"null")) is False


# -- is_unload (an empty prompt or no messages with keep_alive 0) ---------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"model": "m", "keep_alive": 0}, True),  # absent prompt is ""
        ({"model": "m", "prompt": "", "keep_alive": 0}, True),
        ({"model": "m", "prompt": "", "keep_alive": "0s"}, True),
        ({"model": "m", "prompt": "", "keep_alive": "0"}, True),
        ({"model": "m", "prompt": "hi", "keep_alive": 0}, False),  # runs, then unloads when idle
        ({"model": "m", "prompt": ""}, False),  # load-only
        ({"model": "m", "prompt": "", "keep_alive": None}, False),
        ({"model": "m", "prompt": "", "keep_alive": "5m"}, False),
        ({"model": "m", "prompt": "", "keep_alive": -1}, False),
    ],
)
def test_generate_unload(fields: dict[str, Any], expected: bool) -> None:
    assert is_unload("/api/generate", view(**fields)) is expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"model": "m", "keep_alive": 0}, True),
        ({"model": "m", "messages": [], "keep_alive": 0}, True),
        ({"model": "m", "messages": [], "keep_alive": "0m"}, True),
        ({"model": "m", "messages": [{"role": "user", "content": ""}], "keep_alive": 0}, False),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "keep_alive": 0}, False),
        ({"model": "m", "messages": []}, False),
        ({"model": "m", "messages": [], "keep_alive": "10m"}, False),
        (
            {"model": "m", "prompt": "", "messages": [{"role": "user", "content": "hi"}], "keep_alive": 0},
            False,
        ),
    ],
)
def test_chat_unload(fields: dict[str, Any], expected: bool) -> None:
    assert is_unload("/api/chat", view(**fields)) is expected


@pytest.mark.parametrize(
    ("endpoint", "raw"),
    [
        ("/api/generate", b'{"model":"llama3.2","keep_alive":0}'),
        ("/api/generate", b'{"model":"llama3.2","prompt":"","keep_alive":"0s"}'),
        ("/api/chat", b'{"model":"llama3.2","messages":[],"keep_alive":0}'),
    ],
)
def test_unload_detected_from_a_real_body(endpoint: str, raw: bytes) -> None:
    assert is_unload(endpoint, decode_view(raw)) is True


@pytest.mark.parametrize(
    "endpoint",
    [
        "/api/embed",
        "/api/embeddings",
        "/api/show",
        "/api/pull",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/api/generate/",
        "/API/GENERATE",
    ],
)
def test_no_unload_shortcut_elsewhere(endpoint: str) -> None:
    assert is_unload(endpoint, view(prompt="", messages=[], keep_alive=0)) is False


# -- model_work: a vendor pin is stripped from the body, everything else kept ---------------------


def test_pin_is_stripped_and_every_other_field_kept() -> None:
    original = {
        "model": "amd/llama3",
        "prompt": 'Grüße 🌍 "quoted" \\ back\nslash',
        "stream": False,
        "keep_alive": "5m",
        "options": {"num_ctx": 8192, "temperature": 0.7, "stop": ["\n\n", "User:"], "seed": -1},
        "images": ["aGVsbG8="],
        "format": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        "context": [1, 2, 3, 18446744073709551615],
        "think": None,
        "raw": True,
    }
    work = model_work("/api/generate", json.dumps(original).encode(), "amd/llama3")
    out = json.loads(work.body)
    assert out == {**original, "model": "llama3"}
    assert list(out) == list(original)  # key order kept too
    assert (work.vendor, work.echo_model, work.upstream_model) == ("amd", "amd/llama3", "llama3")
    assert work.model is not None and work.model.key == "llama3:latest"


def test_unpinned_body_travels_unchanged() -> None:
    body = b'{"model": "llama3",  "prompt":"x"}'
    work = model_work("/api/generate", body, "llama3", vendor="nvidia", strict=True)
    assert work.body is body and work.echo_model is None and (work.vendor, work.strict) == ("nvidia", True)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@PROPERTY
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_pin_strip_property(obj: dict[str, Any]) -> None:
    obj = {**obj, "model": "llama3@nvidia"}
    out = json.loads(model_work("/api/chat", json.dumps(obj).encode(), "llama3@nvidia").body)
    assert out == {**obj, "model": "llama3"}


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (0.5, 0.5),
        (300, 300.0),
        (-1, math.inf),
        ("0", 0.0),
        ("1ns", 1e-9),
        ("0.4s", 0.4),
        ("1h30m", 5400.0),
        ("1m0.5s", 60.5),
        ("500ms", 0.5),
        ("-1m", math.inf),
        ("300", None),  # a string without a unit: Ollama's 400
        (True, None),
        (None, None),
    ],
)
def test_keep_alive_as_ollama_reads_it(value: Any, seconds: float | None) -> None:
    assert keep_alive_s(ka(value)) == (seconds if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize("value", [0, 0.5, 0.999, "0s", "1ns", "0.4s", "999ms"])
def test_a_keep_alive_under_a_second_ends_the_runner(value: Any) -> None:
    assert ends_runner(ka(value))


@pytest.mark.parametrize("value", [1, "1s", "5m", -1, "-1m", "300", None])
def test_a_keep_alive_of_a_second_or_more_does_not(value: Any) -> None:
    assert not ends_runner(ka(value))


@pytest.mark.parametrize(
    ("endpoint", "body", "streamed"),
    [
        ("/api/generate", b'{"model":"m"}', True),  # Ollama's default
        ("/api/chat", b'{"model":"m","stream":false}', False),
        ("/api/chat", b'{"model":"m","stream":true}', True),
        ("/v1/chat/completions", b'{"model":"m"}', False),  # OpenAI's default
        ("/v1/completions", b'{"model":"m","stream":true}', True),
        ("/api/embed", b'{"model":"m","stream":true}', False),  # never streams
        ("/v1/embeddings", b'{"model":"m"}', False),
    ],
)
def test_whether_ollama_streams_the_answer(endpoint: str, body: bytes, streamed: bool) -> None:
    assert streams(endpoint, decode_view(body)) is streamed
