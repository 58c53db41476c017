"""Bodies read as Go's encoding/json reads them: invalid UTF-8, lone surrogate escapes, text after
the JSON value, keys in other letter case."""

from __future__ import annotations

import json

import msgspec
import pytest
from corral.protocol.gojson import as_go_reads, base64_error, first_value, fold_keys


@pytest.mark.parametrize(
    ("body", "read"),
    [
        (rb'"a\ud800b"', "a\ufffdb"),  # a first half alone
        (rb'"a\udc00b"', "a\ufffdb"),  # a second half alone
        (rb'"\ud83d\ude00"', "\U0001f600"),  # a pair: one character
        (rb'"\uD83D\uDE00"', "\U0001f600"),  # hex digits in either case
        (rb'"\ud83d\ud83d\ude00"', "\ufffd\U0001f600"),  # a first half, then a pair
        (rb'"\ud83dx\ude00"', "\ufffdx\ufffd"),  # halves apart are alone
        (rb'"\ude00\ud83d"', "\ufffd\ufffd"),  # in the wrong order
        (rb'"\\ud800"', "\\ud800"),  # an escaped backslash, then plain text
        (rb'"\\\ud800"', "\\\ufffd"),  # an escaped backslash, then an escape
        (rb'"\u0041\ud800"', "A\ufffd"),
        (b'"a\xffb"', "a\ufffdb"),  # not UTF-8
        (b'"\xff\\ud800"', "\ufffd\ufffd"),
    ],
)
def test_what_go_reads_a_strict_decoder_reads_too(body: bytes, read: str) -> None:
    assert msgspec.json.decode(as_go_reads(body)) == read


def test_a_body_with_nothing_to_replace_is_the_same_bytes() -> None:
    body = json.dumps({"prompt": "plain \u00e9 \\u text", "emoji": "\U0001f600"}).encode()
    assert as_go_reads(body) == body


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("", None),
        ("aGk=", None),
        ("ab==", None),
        ("aGk=\n", None),  # newlines anywhere are skipped
        ("aG\r\nk=", None),
        ("abc", 0),  # a last quantum without its padding: Go reports where that quantum began
        ("aGVsbG8gd29ybGQ", 12),
        ("a", 0),
        ("not base64!", 3),  # the space
        ("ab=", 3),  # one "=" where two were due
        ("ab=c", 2),
        ("a===", 1),
        ("ab==x", 4),  # anything after the padding
        ("data:image/png;base64,aGk=", 4),  # a data URL is not base64 text
    ],
)
def test_an_image_is_read_as_go_reads_base64(text: str, bad: int | None) -> None:
    """Go's encoding/base64 (standard, padded) positions, as `illegal base64 data at input byte N`."""
    expected = None if bad is None else f"illegal base64 data at input byte {bad}"
    assert base64_error(text) == expected


@pytest.mark.parametrize(
    ("body", "first"),
    [
        (b'{"a": 1} trailing', b'{"a": 1}'),
        (b'  {"a": 1}{"b": 2}', b'{"a": 1}'),  # a second value is left unread too
        (b'{"a": "}"}\n\n]', b'{"a": "}"}'),  # a brace inside a string ends nothing
        (b"[1, 2] 3", b"[1, 2]"),
        (rb'{"a": "\u00e9"} x', rb'{"a": "\u00e9"}'),  # escapes kept as written
        (b'{"a": 1', None),  # cut short: no whole value
        (b"x{}", None),
        (b"", None),
    ],
)
def test_the_first_json_value_is_what_go_reads_of_a_body(body: bytes, first: bytes | None) -> None:
    assert first_value(body) == first


def test_keys_in_other_letter_case_name_their_field_and_the_last_one_wins() -> None:
    fields = {"model", "stream", "keep_alive"}
    assert fold_keys({"Model": "a", "STREAM": False, "Keep_Alive": 0}, fields) == {
        "model": "a",
        "stream": False,
        "keep_alive": 0,
    }
    assert fold_keys({"model": "a", "Model": "b"}, fields) == {"model": "b"}  # Go: the last key wins
    assert fold_keys({"Model": "b", "model": "a"}, fields) == {"model": "a"}
    assert fold_keys({"Prompt": "x", "Model": "a"}, fields) == {"Prompt": "x", "model": "a"}  # others kept
    assert fold_keys({"model": "a", "Prompt": "x"}, fields) is None  # nothing to rename
