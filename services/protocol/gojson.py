"""JSON text as Go's encoding/json reads it, for bodies a strict decoder refuses or reads
otherwise, but Ollama serves (https://pkg.go.dev/encoding/json#Unmarshal). Go is lenient in ways
a strict decoder (msgspec) is not:

- bytes that are not UTF-8 are read as U+FFFD, one per bad byte;
- a ``\\uXXXX`` escape of a UTF-16 surrogate that is not the first half of a pair followed at once
  by its second half (a lone surrogate: what JavaScript's ``JSON.stringify`` writes for a string
  cut in the middle of an emoji) is read as U+FFFD;
- what follows the body's JSON value is left unread (`first_value`: gin binds request bodies
  with a ``json.Decoder``, which reads one value);
- keys match struct fields whatever their letter case (`fold_keys`: ``"Model"`` is ``model``).

`as_go_reads` rewrites a body so that a strict decoder reads what Go reads for the first two;
callers use these only after the strict decoder refused the body or missed a field, so well-formed
bodies never pay for them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import TypeVar

# a run of backslashes, then u and a surrogate's four hex digits: an escape when the run is odd
_SURROGATE_ESCAPE = re.compile(rb"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")
_REPLACEMENT = rb"\ufffd"


def as_go_reads(body: bytes) -> bytes:
    """``body`` with invalid UTF-8 and lone surrogate escapes replaced as Go reads them (U+FFFD);
    the same bytes when there is nothing to replace."""
    fixed = body.decode("utf-8", "replace").encode()
    return _lone_surrogates(fixed) if b"\\u" in fixed else fixed


def _lone_surrogates(text: bytes) -> bytes:
    escapes = [m for m in _SURROGATE_ESCAPE.finditer(text) if len(m.group(1)) % 2]
    out: list[bytes] = []
    done = 0  # where the text not yet copied begins
    i = 0
    while i < len(escapes):
        m = escapes[i]
        nxt = escapes[i + 1] if i + 1 < len(escapes) else None
        if (
            _is_high(m)
            and nxt is not None
            and nxt.start() == m.end()  # the very next escape, nothing between
            and len(nxt.group(1)) == 1
            and not _is_high(nxt)
        ):
            i += 2  # a pair: read as one character
            continue
        out += [text[done : m.end(1) - 1], _REPLACEMENT]
        done = m.end()
        i += 1
    if not out:
        return text
    out.append(text[done:])
    return b"".join(out)


def _is_high(m: re.Match[bytes]) -> bool:
    """A first half (U+D800–U+DBFF); else a second half (U+DC00–U+DFFF)."""
    return m.group(2)[1:2].lower() in b"89ab"


_BYTE = re.compile(r"\(byte (\d+)\)")


def syntax_message(msgspec_message: str, body: bytes) -> str:
    """What Go's encoding/json says of ``body`` where msgspec refused it with ``msgspec_message``
    (``unexpected EOF``, ``invalid character 'x' looking for beginning of value``, ...)."""
    if "truncated" in msgspec_message:
        return "unexpected EOF"
    m = _BYTE.search(msgspec_message)
    pos = int(m.group(1)) if m else 0
    ch = chr(body[pos]) if pos < len(body) else "?"
    first = len(body) - len(body.lstrip())
    if pos <= first:
        return f"invalid character '{ch}' looking for beginning of value"
    if "trailing" in msgspec_message:
        return f"invalid character '{ch}' after top-level value"
    return f"invalid character '{ch}' looking for beginning of object key string"


def kind(value: object) -> str:
    """How Go's encoding/json names a JSON value it cannot store in a field (``number``, ...)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "array" if isinstance(value, list) else "object"


_B64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_NEWLINES = b"\r\n"


def base64_error(text: str) -> str | None:
    """What Go's encoding/json says of ``text`` stored in a ``[]byte`` field (an image): standard
    base64 with padding, newlines skipped (`encoding/base64`'s ``decodeQuantum``), else
    ``illegal base64 data at input byte N``; None when it decodes."""
    src = text.encode("utf-8", "surrogatepass")
    si = 0
    while True:
        j, si, bad = _quantum(src, si)
        if bad is not None:
            return f"illegal base64 data at input byte {bad}"
        if j < 4:  # the end: nothing more, or a padded last quantum
            return None


def _quantum(src: bytes, si: int) -> tuple[int, int, int | None]:
    """One quantum from ``si``: (characters read, where the next begins, the bad byte or None)."""
    for j in range(4):
        while True:
            if si == len(src):
                return (0, si, None) if j == 0 else (j, si, si - j)
            c = src[si]
            si += 1
            if c in _B64:
                break
            if c in _NEWLINES:
                continue
            if c != ord("=") or j < 2:
                return j, si, si - 1
            if j == 2:  # "==" expected: the second, after any newlines
                while si < len(src) and src[si] in _NEWLINES:
                    si += 1
                if si == len(src):
                    return j, si, len(src)
                if src[si] != ord("="):
                    return j, si, si - 1
                si += 1
            while si < len(src) and src[si] in _NEWLINES:
                si += 1
            return j, si, (si if si < len(src) else None)  # anything after the padding is garbage
    return 4, si, None


_FIRST = json.JSONDecoder()
_JSON_SPACE = " \t\r\n"


def first_value(body: bytes) -> bytes | None:
    """The JSON value ``body`` begins with, without what follows it; None when it does not begin
    with a whole one. Go's ``json.Decoder`` (gin binds request bodies with it) reads the first value
    and leaves the rest unread, so Ollama serves ``{"model": …} trailing``; a strict decoder refuses it."""
    text = body.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        _, end = _FIRST.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    return text[start:end].encode()


V = TypeVar("V")


def fold_keys(obj: dict[str, V], fields: Collection[str]) -> dict[str, V] | None:
    """``obj`` with each key that names one of ``fields`` in other letter case (``"Model"``) renamed
    to it, as Go's encoding/json matches keys to struct fields ignoring case; of several keys for one
    field the last wins, as in Go. None when every key is spelt as its field already (or names none)."""
    if all(k in fields or k.lower() not in fields for k in obj):
        return None
    out: dict[str, V] = {}
    for k, v in obj.items():
        out[k if k in fields or k.lower() not in fields else k.lower()] = v
    return out
