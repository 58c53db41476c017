"""A batch's lines, pure: the input file checked as OpenAI checks it, each line as it waits in the
line stream and as its result is kept, and the output and error files assembled from the results.

Input (one JSON object per line): ``{"custom_id", "method": "POST", "url", "body"}``, the url one
of `ENDPOINTS` and the batch's own endpoint, every custom_id different. Any line that is not so
fails the whole batch at validation, ``errors.data`` naming each line (1-based) — nothing runs.

Output, in input order: a line that got a 2xx answer goes to the output file, every other one to the
error file — a model's own refusal (a 4xx) with its ``response`` (status and body) and
``"error": null``, a line that never got an answer (retries used up, cancelled, expired) with
``"response": null`` and ``"error": {"code", "message"}``. Shapes:
https://platform.openai.com/docs/guides/batch
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec
from corral.gateway.batch.model import (
    ENDPOINTS,
    BatchError,
    BatchUsage,
    InputTokensDetails,
    OutputTokensDetails,
    RequestCounts,
)
from corral.protocol.errors import InvalidModelName
from corral.protocol.names import parse_name

MAX_ERRORS: Final = 100  # errors.data names at most this many lines
CANCELLED: Final = "batch_cancelled"
EXPIRED: Final = "batch_expired"


class Line(msgspec.Struct, kw_only=True):
    """One line waiting in the line stream (its body with ``stream`` off)."""

    batch: str
    index: int
    custom_id: str
    url: str
    body: msgspec.Raw
    spilled: str = ""  # the object holding the body, when it was too big for one message


class LineError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class LineResult(msgspec.Struct, kw_only=True):
    """A line's result as the results bucket keeps it: an answer (``status``, ``body``) or, for a
    line that got none, ``error``."""

    custom_id: str
    status: int = 0
    request_id: str = ""
    body: msgspec.Raw = msgspec.Raw(b"null")
    error: LineError | None = None
    spilled: str = ""  # the object holding the whole result, when it was too big for one entry

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.error is None


line_decoder = msgspec.json.Decoder(Line)
result_decoder = msgspec.json.Decoder(LineResult)


class _Response(msgspec.Struct):
    status_code: int
    request_id: str
    body: msgspec.Raw


class _Output(msgspec.Struct):
    id: str
    custom_id: str
    response: _Response | None
    error: LineError | None


class _Named(msgspec.Struct):
    model: str | None = None


class _Cached(msgspec.Struct):
    cached_tokens: int = 0


class _Reasoning(msgspec.Struct):
    reasoning_tokens: int = 0


class _Usage(msgspec.Struct):
    """The ``usage`` of an OpenAI-style answer (chat, completions, embeddings)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: _Cached | None = None
    completion_tokens_details: _Reasoning | None = None


class _Answered(msgspec.Struct):
    usage: _Usage | None = None


_named_decoder = msgspec.json.Decoder(_Named)
_answered_decoder = msgspec.json.Decoder(_Answered)


def _error(errors: list[BatchError], code: str, message: str, line: int, param: str | None = None) -> None:
    if len(errors) < MAX_ERRORS:
        errors.append(BatchError(code=code, message=message, line=line, param=param))


def parse_input(
    data: bytes, endpoint: str, *, max_lines: int
) -> tuple[list[tuple[str, bytes]], list[BatchError]]:
    """The lines of an input file as (custom_id, body with ``stream`` off), or the errors that fail
    it (then the lines are of no use)."""
    lines: list[tuple[str, bytes]] = []
    errors: list[BatchError] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item: Any = msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError):  # nested past the decoder's depth, too
            _error(errors, "invalid_json_line", "This line is not parseable as valid JSON.", number)
            continue
        if not isinstance(item, dict):
            _error(errors, "invalid_json_line", "This line is not a JSON object.", number)
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            _error(errors, "missing_required_parameter", "custom_id is required.", number, "custom_id")
            continue
        if custom_id in seen:
            _error(
                errors,
                "duplicate_custom_id",
                f"The custom_id '{custom_id}' is used twice.",
                number,
                "custom_id",
            )
            continue
        seen.add(custom_id)
        if item.get("method") != "POST":
            _error(errors, "invalid_method", "The method must be 'POST'.", number, "method")
            continue
        url = item.get("url")
        if url not in ENDPOINTS:
            _error(errors, "invalid_url", f"The url must be one of {', '.join(ENDPOINTS)}.", number, "url")
            continue
        if url != endpoint:
            message = f"The url '{url}' does not match the batch's endpoint '{endpoint}'."
            _error(errors, "mismatched_endpoint", message, number, "url")
            continue
        body = item.get("body")
        if not isinstance(body, dict):
            _error(errors, "missing_required_parameter", "body must be a JSON object.", number, "body")
            continue
        body["stream"] = False  # a line's answer is stored whole
        body.pop("stream_options", None)
        lines.append((custom_id, msgspec.json.encode(body)))
    if not lines and not errors:
        errors.append(BatchError(code="empty_file", message="The input file has no requests."))
    elif len(lines) + len(errors) > max_lines:
        message = f"The input file has more than {max_lines} requests."
        errors.insert(0, BatchError(code="too_many_requests", message=message))
    return lines, errors


def common_model(lines: Sequence[tuple[str, bytes]]) -> str | None:
    """The model every line's body names (``llama3.2`` and ``llama3.2:latest`` are one: the first
    line's spelling), or None if they name different ones (or none, or one that is no name)."""
    first: str | None = None
    keys: set[str] = set()
    for _, body in lines:
        try:
            name = _named_decoder.decode(body).model
            keys.add(parse_name(name).key if name else "")
        except (msgspec.ValidationError, InvalidModelName):  # that line fails when it runs
            return None
        first = first or name
        if len(keys) > 1:
            return None
    return first if keys and "" not in keys else None


def answered(custom_id: str, status: int, body: bytes, request_id: str) -> LineResult:
    """The result of a line that got an HTTP answer; a body that is not JSON is kept as a string."""
    try:
        msgspec.json.decode(body)
        raw = msgspec.Raw(body)
    except msgspec.DecodeError:
        raw = msgspec.Raw(msgspec.json.encode(body.decode("utf-8", "replace")))
    return LineResult(custom_id=custom_id, status=status, request_id=request_id, body=raw)


def unanswered(custom_id: str, code: str, message: str) -> LineResult:
    return LineResult(custom_id=custom_id, error=LineError(code=code, message=message))


def request_line_id(batch_id: str, index: int) -> str:
    return f"batch_req_{batch_id.split('_', 1)[1]}{index:08x}"


def usage_of(results: Sequence[LineResult]) -> BatchUsage:
    """The token usage of every answer that reports one, in the Batch object's terms (input and
    output tokens for OpenAI's prompt and completion tokens)."""
    total = BatchUsage()
    cached = reasoning = 0
    for r in results:
        if r.error is not None:
            continue
        try:
            u = _answered_decoder.decode(r.body).usage
        except msgspec.DecodeError:  # a body kept as a string, or not an OpenAI answer
            continue
        if u is None:
            continue
        total.input_tokens += u.prompt_tokens
        total.output_tokens += u.completion_tokens
        total.total_tokens += u.total_tokens or u.prompt_tokens + u.completion_tokens
        cached += u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
        reasoning += u.completion_tokens_details.reasoning_tokens if u.completion_tokens_details else 0
    total.input_tokens_details = InputTokensDetails(cached_tokens=cached)
    total.output_tokens_details = OutputTokensDetails(reasoning_tokens=reasoning)
    return total


def assemble(batch_id: str, results: Sequence[LineResult]) -> tuple[bytes, bytes, RequestCounts, BatchUsage]:
    """The output and error files (JSONL, input order), the counts and the usage, from every line's
    result."""
    out: list[bytes] = []
    err: list[bytes] = []
    for index, r in enumerate(results):
        response = None
        if r.error is None:
            response = _Response(r.status, r.request_id, r.body)
        line = msgspec.json.encode(_Output(request_line_id(batch_id, index), r.custom_id, response, r.error))
        (out if r.ok else err).append(line + b"\n")
    counts = RequestCounts(total=len(results), completed=len(out), failed=len(err))
    return b"".join(out), b"".join(err), counts, usage_of(results)
