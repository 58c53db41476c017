"""The Files and Batch APIs over HTTP, as OpenAI serves them, so the ``openai`` SDK works unchanged:

    POST /v1/files (multipart: file, purpose, expires_after)   GET /v1/files   GET|DELETE /v1/files/{id}
    GET /v1/files/{id}/content
    POST /v1/batches   GET /v1/batches   GET /v1/batches/{id}   POST /v1/batches/{id}/cancel

https://platform.openai.com/docs/api-reference/files and .../batch. With API keys on, a user key
sees and uses only the files and batches it made; an admin key sees all. Errors have OpenAI's shape.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec
from corral.gateway.auth import key_of
from corral.gateway.batch import model
from corral.gateway.batch.model import ENDPOINTS, Batch, BatchRecord, FileMeta, Refused, now, visible_to
from corral.gateway.batch.store import Conflict
from corral.gateway.errors import JSON, TOO_DEEP, json_error
from corral.runtime.nats import error_text
from fastapi import FastAPI, Request
from fastapi.responses import Response
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from starlette.datastructures import UploadFile

if TYPE_CHECKING:
    from corral.gateway.app import Gateway
    from corral.gateway.batch.store import BatchStore

log = logging.getLogger(__name__)

PURPOSES = frozenset({"batch", "assistants", "fine-tune", "vision", "user_data", "evals"})
MAX_METADATA = 16  # OpenAI's bound on metadata pairs
LIVE = frozenset({"in_progress", "cancelling", "finalizing"})


class _List(msgspec.Struct):
    data: list[Any]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: str = "list"


class _ExpiresAfter(msgspec.Struct):
    anchor: str
    seconds: int


class _CreateBatch(msgspec.Struct, kw_only=True):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: _ExpiresAfter | None = None


class _Deleted(msgspec.Struct):
    id: str
    object: str = "file"
    deleted: bool = True


_create_batch = msgspec.json.Decoder(_CreateBatch)


def _json(value: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(value), status_code=status, media_type=JSON)


def _error(status: int, message: str) -> Response:
    return json_error(status, message, api="openai")


def _viewer(request: Request) -> str | None:
    """Whose objects this caller sees: None for all (keys off, an admin key), else its key's name."""
    key = key_of(request.scope)
    return None if key is None or key.admin else key.name


def _owner(request: Request) -> str:
    key = key_of(request.scope)
    return key.name if key is not None else ""


def _page(items: list[Any], after: str | None, limit: int, *, newest_first: bool = True) -> _List:
    """One page of ``items`` (sorted by id, newest first unless told otherwise) after the id
    ``after``: a position, not an item that must still be there (a client deleting what it lists
    page by page asks for the page after one it just deleted). Ids sort by creation time."""
    if after is not None:
        items = [i for i in items if (i.id < after if newest_first else i.id > after)]
    page = items[:limit]
    return _List(page, len(items) > limit, page[0].id if page else None, page[-1].id if page else None)


def _limit(raw: str | None, default: int, most: int) -> int:
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise ValueError(f"limit must be between 1 and {most}")
    return value


async def _live_counts(store: BatchStore, rec: BatchRecord) -> Batch:
    """The batch with its request counts as they are now (stored only once it finishes)."""
    if rec.batch.status not in LIVE or rec.total < 0:
        return rec.batch
    done = await store.done_count(rec.batch.id)
    failed = await store.failed_count(rec.batch.id)
    counts = model.RequestCounts(total=rec.total, completed=done - failed, failed=failed)
    return msgspec.structs.replace(rec.batch, request_counts=counts)


def mount(app: FastAPI, gw: Gateway) -> None:
    def store() -> BatchStore:
        """The stores: every route but an upload first makes sure they exist (`opened`)."""
        return gw.batches.lifecycle.store

    async def opened() -> bool:
        return await gw.batches.open(create=False) is not None

    # -- files -------------------------------------------------------------------------------------
    @app.post("/v1/files")
    async def create_file(request: Request) -> Response:
        async with request.form() as form:  # closes the upload's spooled file
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                return _error(400, "a file is required (multipart field 'file')")
            if not isinstance(purpose, str) or purpose not in PURPOSES:
                return _error(400, f"purpose must be one of {', '.join(sorted(PURPOSES))}")
            anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
            try:
                expires_s = None if anchor is seconds is None else model.expiry_seconds(anchor, seconds)
            except ValueError as e:
                return _error(400, str(e))
            data = await upload.read()
            filename = upload.filename or "file"
        created = now()
        meta = FileMeta(
            filename=filename,
            purpose=purpose,
            created_at=created,
            owner=_owner(request),
            expires_at=FileMeta.expiry(created, expires_s),
        )
        try:
            await gw.batches.open(create=True)
        except (NatsError, JetStreamError, TimeoutError) as e:  # under a NATS identity: not ours to make
            log.warning("cannot open or make the Batch API's stores: %r", e)
            return _error(503, "the Batch API's stores are not there and cannot be made by this gateway: "
                          "the operator's `corral status` makes them")  # fmt: skip
        return _json(await store().put_file(model.new_id("file"), data, meta))

    @app.get("/v1/files")
    async def list_files(request: Request) -> Response:
        q = request.query_params
        try:
            limit = _limit(q.get("limit"), 10_000, 10_000)
        except ValueError as e:
            return _error(400, str(e))
        viewer, purpose = _viewer(request), q.get("purpose")
        if not await opened():
            return _json(_page([], None, limit))
        files = [
            f
            for f, meta in await store().files()
            if visible_to(meta, viewer) and purpose in (None, f.purpose)
        ]
        newest_first = q.get("order", "desc") != "asc"
        files.sort(key=lambda f: f.id, reverse=newest_first)
        return _json(_page(files, q.get("after"), limit, newest_first=newest_first))

    async def visible_file(request: Request, file_id: str) -> model.FileObject | None:
        found = await store().file(file_id) if model.is_id(file_id) and await opened() else None
        if found is None or not visible_to(found[1], _viewer(request)):
            return None
        return found[0]

    @app.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str) -> Response:
        found = await visible_file(request, file_id)
        return _json(found) if found is not None else _error(404, f"No such File object: {file_id}")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> Response:
        if await visible_file(request, file_id) is None or not await store().delete_file(file_id):
            return _error(404, f"No such File object: {file_id}")
        return _json(_Deleted(file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> Response:
        data = await store().file_data(file_id) if await visible_file(request, file_id) else None
        if data is None:
            return _error(404, f"No such File object: {file_id}")
        return Response(data, media_type="application/octet-stream")

    # -- batches -----------------------------------------------------------------------------------
    @app.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        try:
            asked = _create_batch.decode(await request.body())
            model.window_seconds(asked.completion_window)
            after = asked.output_expires_after
            output_expires_s = None if after is None else model.expiry_seconds(after.anchor, after.seconds)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            return _error(400, f"invalid request: {e}")
        except RecursionError:
            return _error(400, TOO_DEEP)
        if asked.endpoint not in ENDPOINTS:
            return _error(400, f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if asked.metadata is not None and len(asked.metadata) > MAX_METADATA:
            return _error(400, f"metadata may hold at most {MAX_METADATA} pairs")
        found = await visible_file(request, asked.input_file_id)
        if found is None:
            return _error(404, f"No such File object: {asked.input_file_id}")
        if found.purpose != "batch":
            return _error(400, f"the input file's purpose must be 'batch', not {found.purpose!r}")
        record = model.new_batch(
            model.new_id("batch"),
            endpoint=asked.endpoint,
            input_file_id=asked.input_file_id,
            window=asked.completion_window,
            now=now(),
            owner=_owner(request),
            metadata=asked.metadata,
            output_expires_s=output_expires_s,
        )
        await store().create_batch(record)
        try:
            validated = await gw.batches.lifecycle.validate(record.batch.id)
        except (NatsError, JetStreamError, TimeoutError, Conflict) as e:  # made: the sweep validates it again
            log.warning("batch %s: validation put off (%s)", record.batch.id, error_text(e))
            validated = None  # a 500 here made clients retry, each retry another batch
        return _json(await _live_counts(store(), validated or record))

    async def visible_batch(request: Request, batch_id: str) -> BatchRecord | None:
        stored = await store().batch(batch_id) if model.is_id(batch_id) and await opened() else None
        if stored is None or not visible_to(stored.record, _viewer(request)):
            return None
        return stored.record

    @app.get("/v1/batches")
    async def list_batches(request: Request) -> Response:
        q = request.query_params
        try:
            limit = _limit(q.get("limit"), 20, 100)
        except ValueError as e:
            return _error(400, str(e))
        viewer = _viewer(request)
        if not await opened():
            return _json(_page([], None, limit))
        records = [s.record for s in await store().batches() if visible_to(s.record, viewer)]
        records.sort(key=lambda r: r.batch.id, reverse=True)  # newest first, as OpenAI lists them
        page = _page([r.batch for r in records], q.get("after"), limit)
        by_id = {r.batch.id: r for r in records}
        page.data = [await _live_counts(store(), by_id[b.id]) for b in page.data]
        return _json(page)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(request: Request, batch_id: str) -> Response:
        rec = await visible_batch(request, batch_id)
        if rec is None:
            return _error(404, f"No batch found with id '{batch_id}'.")
        return _json(await _live_counts(store(), rec))

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        if await visible_batch(request, batch_id) is None:
            return _error(404, f"No batch found with id '{batch_id}'.")
        try:
            rec = await store().change(batch_id, lambda r: model.cancel(r, now()))
        except Refused as e:
            return _error(409, str(e))
        if rec is None:
            return _error(404, f"No batch found with id '{batch_id}'.")
        await gw.batches.lifecycle.maybe_finalize(batch_id)  # no line left to run: it ends now
        stored = await store().batch(batch_id)
        return _json(await _live_counts(store(), stored.record if stored is not None else rec))
