"""Bodies read as Go's encoding/json reads them: invalid UTF-8 and lone surrogate escapes."""

from __future__ import annotations

import json

import msgspec
import pytest
from corral.protocol.gojson import as_go_reads


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
