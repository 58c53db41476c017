"""The Batch API's objects as OpenAI shows them, and a batch's life as a pure state machine.

A batch moves ``validating → in_progress → finalizing → completed``; a bad input file ends it at
``failed``; a cancel goes ``cancelling → cancelled``; a batch still running at its ``expires_at``
finishes as ``expired`` (its remaining lines answered ``batch_expired``). Every change is a function
from one record to the next that raises `Refused` where OpenAI refuses it; the store writes the
result by compare-and-set on the revision it read (`corral.gateway.batch.store`).

Object shapes: https://platform.openai.com/docs/api-reference/batch/object and
https://platform.openai.com/docs/api-reference/files/object
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Final, Literal

import msgspec

Status = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
TERMINAL: Final = frozenset({"failed", "completed", "expired", "cancelled"})
ENDPOINTS: Final = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_WINDOW = re.compile(r"([1-9][0-9]{0,5})([smh])")
_SECONDS: Final = {"s": 1, "m": 60, "h": 3600}
_ID = re.compile(r"(batch|file)[_-][0-9a-f]{12,40}")
EXPIRY_S: Final = (3600, 2_592_000)  # the seconds an expires_after may give: 1 hour to 30 days


def now() -> int:
    """Wall-clock seconds, as OpenAI's timestamps are."""
    return int(time.time())


class Refused(Exception):
    """A change OpenAI refuses in this state (a cancel of a finished batch): HTTP 409."""


class BatchError(msgspec.Struct, kw_only=True):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class Errors(msgspec.Struct, kw_only=True):
    data: list[BatchError]
    object: str = "list"


class RequestCounts(msgspec.Struct, kw_only=True):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0


class BatchUsage(msgspec.Struct, kw_only=True):
    """The tokens of every line that was answered, summed once the batch's files are written."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class Batch(msgspec.Struct, kw_only=True):
    """A batch exactly as ``GET /v1/batches/{id}`` shows it: one attribute per field of OpenAI's
    batch object, so its many attributes are the wire shape, not state."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    object: str = "batch"
    status: Status = "validating"
    errors: Errors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    model: str | None = None  # the model every line names (None while validating, or if they differ)
    usage: BatchUsage | None = None


class BatchRecord(msgspec.Struct, kw_only=True):
    """What the batches bucket keeps: the public batch and what only the runners need.
    ``owner``: the name of the API key that made it (its lines run as that key); ``total``: lines
    queued (-1 until its lines are in the line stream); ``ending``: "expire" once its window has
    passed; ``closing``: a runner has taken the writing of its files (a cancelling batch)."""

    batch: Batch
    owner: str = ""
    total: int = -1
    ending: Literal["", "expire"] = ""
    closing: bool = False
    output_expires_s: int | None = None  # its output and error files expire this long after written


class FileObject(msgspec.Struct, kw_only=True):
    """A file as ``GET /v1/files/{id}`` shows it."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: str = "file"
    status: str = "processed"
    expires_at: int | None = None


class FileMeta(msgspec.Struct, kw_only=True):
    """What the object store keeps beside a file's bytes (its object's description)."""

    filename: str
    purpose: str
    created_at: int
    owner: str = ""
    expires_at: int | None = None

    @staticmethod
    def expiry(created_at: int, after_s: int | None) -> int | None:
        """The ``expires_at`` of a file made at ``created_at`` that expires ``after_s`` later (None: never)."""
        return None if after_s is None else created_at + after_s

    def expired(self, now: int) -> bool:
        return self.expires_at is not None and now >= self.expires_at


record_decoder = msgspec.json.Decoder(BatchRecord)
file_meta_decoder = msgspec.json.Decoder(FileMeta)


def new_id(kind: Literal["batch", "file"], now: float | None = None) -> str:
    """A fresh id that sorts by creation time (lists are newest first) and is a KV key and a subject
    token: ``batch_`` or ``file-`` and hex."""
    ms = int((time.time() if now is None else now) * 1000)
    sep = "_" if kind == "batch" else "-"
    return f"{kind}{sep}{ms:012x}{secrets.token_hex(6)}"


def is_id(value: str) -> bool:
    """Whether ``value`` can be an id of ours (anything else is a 404 before any store is asked)."""
    return _ID.fullmatch(value) is not None


def output_file_id(batch_id: str, kind: Literal["output", "error"]) -> str:
    """The deterministic id of a batch's output or error file: a finalizer that died is redone by
    another, which writes the same file under the same id."""
    digits = batch_id.split("_", 1)[1]
    return f"file-{digits}{'0' if kind == 'output' else 'e'}"


def window_seconds(window: str) -> int:
    """The seconds of a completion window (``24h``; also ``90m``, ``600s``); ValueError otherwise."""
    m = _WINDOW.fullmatch(window)
    if m is None:
        raise ValueError(f"invalid completion_window {window!r}: use a duration such as '24h'")
    return int(m.group(1)) * _SECONDS[m.group(2)]


def expiry_seconds(anchor: object, seconds: object) -> int:
    """The seconds of an ``expires_after`` (``{"anchor": "created_at", "seconds": N}``, N from one hour
    to 30 days, as OpenAI bounds it); ValueError otherwise."""
    if anchor != "created_at":
        raise ValueError("expires_after.anchor must be 'created_at'")
    if isinstance(seconds, bool) or not isinstance(seconds, int | str):
        raise ValueError("expires_after.seconds must be an integer")
    try:
        value = int(seconds)
    except ValueError:
        raise ValueError("expires_after.seconds must be an integer") from None
    if not EXPIRY_S[0] <= value <= EXPIRY_S[1]:
        raise ValueError(f"expires_after.seconds must be between {EXPIRY_S[0]} and {EXPIRY_S[1]}")
    return value


def new_batch(
    batch_id: str,
    *,
    endpoint: str,
    input_file_id: str,
    window: str,
    now: int,
    owner: str = "",
    metadata: dict[str, str] | None = None,
    output_expires_s: int | None = None,
) -> BatchRecord:
    batch = Batch(
        id=batch_id,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=window,
        created_at=now,
        expires_at=now + window_seconds(window),
        metadata=metadata,
    )
    return BatchRecord(batch=batch, owner=owner, output_expires_s=output_expires_s)


# -- transitions: each returns the next record, or raises `Refused` ----------------------------------
def _with(r: BatchRecord, **changes: object) -> BatchRecord:
    return msgspec.structs.replace(r, batch=msgspec.structs.replace(r.batch, **changes))


def queued(r: BatchRecord, total: int, now: int, model: str | None = None) -> BatchRecord:
    """Its ``total`` lines, naming ``model`` (None if they differ), are in the line stream: a
    validating batch starts, a batch cancelled while validating only learns its count (its lines
    will be answered ``batch_cancelled``)."""
    counts = RequestCounts(total=total)
    if r.batch.status == "validating":
        r = _with(r, status="in_progress", in_progress_at=now, request_counts=counts, model=model)
    elif r.batch.status == "cancelling":
        r = _with(r, request_counts=counts, model=model)
    else:
        raise Refused(f"a batch that is {r.batch.status} cannot start")
    return msgspec.structs.replace(r, total=total)


def failed(r: BatchRecord, errors: list[BatchError], now: int) -> BatchRecord:
    """The input file is not a valid batch: nothing ran, nothing will."""
    if r.batch.status not in ("validating", "cancelling") or r.total >= 0:
        raise Refused(f"a batch that is {r.batch.status} cannot fail validation")
    return _with(r, status="failed", failed_at=now, errors=Errors(data=errors))


def cancel(r: BatchRecord, now: int) -> BatchRecord:
    if r.batch.status in ("cancelling", "cancelled"):
        return r
    if r.batch.status not in ("validating", "in_progress"):
        raise Refused(f"Cannot cancel a batch with status '{r.batch.status}'.")
    return _with(r, status="cancelling", cancelling_at=now)


def expire(r: BatchRecord) -> BatchRecord:
    """Its window passed while it ran: its remaining lines are answered ``batch_expired``."""
    if r.batch.status != "in_progress" or r.ending:
        raise Refused(f"a batch that is {r.batch.status} cannot expire")
    return msgspec.structs.replace(r, ending="expire")


def finalize(r: BatchRecord, now: int) -> BatchRecord:
    """Every line has its result: one runner takes the writing of the files. A cancelling batch
    stays ``cancelling`` (OpenAI shows no ``finalizing`` there) and is marked ``closing``."""
    if r.batch.status == "in_progress" and r.total >= 0:
        return _with(r, status="finalizing", finalizing_at=now)
    if r.batch.status == "cancelling" and r.total >= 0 and not r.closing:
        return msgspec.structs.replace(r, closing=True)
    raise Refused(f"a batch that is {r.batch.status} cannot be finalized")


def finished(
    r: BatchRecord,
    counts: RequestCounts,
    output_id: str | None,
    error_id: str | None,
    now: int,
    usage: BatchUsage | None = None,
) -> BatchRecord:
    """Its files are written: completed (or expired, or cancelled), with its lines' token usage."""
    files: dict[str, object] = {
        "output_file_id": output_id,
        "error_file_id": error_id,
        "request_counts": counts,
        "usage": usage if usage is not None else BatchUsage(),
    }
    if r.batch.status == "finalizing":
        if r.ending == "expire":
            return _with(r, status="expired", expired_at=now, **files)
        return _with(r, status="completed", completed_at=now, **files)
    if r.batch.status == "cancelling" and r.closing:
        return _with(r, status="cancelled", cancelled_at=now, **files)
    raise Refused(f"a batch that is {r.batch.status} cannot finish")


def visible_to(r: BatchRecord | FileMeta, viewer: str | None) -> bool:
    """Whether a caller sees it: ``viewer`` None (keys off, or an admin key) sees all, a user key's
    name only what that key made."""
    return viewer is None or r.owner == viewer
