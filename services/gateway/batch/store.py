"""Where the Batch API keeps everything, all in JetStream on disk (bounds: `BATCH_STORES`):

- the files (``{root}_files``, an object store): uploads and output files under their ids, each
  object's description holding its `FileMeta` (name, purpose, time, owner);
- the batch records (``{root}_batches``, KV, key = batch id), changed only by compare-and-set on the
  revision read (`BatchStore.change`), so two gateways never both win one transition;
- the lines waiting to run (``{root}_batchlines``, a work-queue stream, subject
  ``{root}.batchline.{batch}``), published with ``Nats-Msg-Id`` = ``{batch}.{index}`` so a
  validation redone after a crash queues no line twice (within the stream's duplicate window);
- each line's result (``{root}_batchresults``, KV, key ``{batch}.{index}``), written only if absent:
  the first result of a line is its result, whoever wrote it and however often it ran. A line whose
  result is a failure also gets ``{batch}.f.{index}``, for the live ``request_counts``.

Counts come from the results stream itself (subjects under a filter), not from a counter a process
could die before bumping.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from corral.gateway.batch.lines import Line, LineResult, result_decoder
from corral.gateway.batch.model import (
    BatchRecord,
    FileMeta,
    FileObject,
    file_meta_decoder,
    now,
    record_decoder,
)
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import BATCH_STORES, BucketSpec, kv_create, open_bucket
from corral.runtime.kvwatch import Latest, latest_per_subject, operation
from corral.runtime.workqueue import STREAM_NAME_IN_USE
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    ObjectInfo,
    ObjectMeta,
    ObjectStoreConfig,
    RetentionPolicy,
    StreamConfig,
)
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 600.0  # a line published again within this is dropped by the stream
READ_TIMEOUT_S = 5.0  # the next message of a listing already under way
PUBLISH_WINDOW = 256  # lines published at once while queueing a batch
CAS_TRIES = 20  # a record contended by this many writers in a row is a bug, not a race
ENVELOPE_BYTES = 16 * 1024  # room kept for a message's headers within NATS's max_payload
SPILL = ".spill."  # in the names of objects holding a line or result too big for one message


class Conflict(Exception):
    """A record kept changing under a compare-and-set more than `CAS_TRIES` times."""


@dataclass(frozen=True)
class Stored:
    """A batch record and the revision it was read at."""

    record: BatchRecord
    revision: int


class SpillRefused(Exception):
    """JetStream would not keep a line too big for one message (the files store is full): the
    batch fails validation, it cannot run."""


class Missing(Exception):
    """The Batch API's stores do not exist yet (nobody has sent a file)."""


async def _object_store(
    js: JetStreamContext, name: str, spec: BucketSpec, replicas: int, create: bool
) -> ObjectStore:
    try:
        return await js.object_store(name)
    except BucketNotFoundError:
        if not create:
            raise Missing(name) from None
    cfg = ObjectStoreConfig(storage=spec.storage, max_bytes=spec.max_bytes, replicas=replicas)
    try:
        return await js.create_object_store(name, config=cfg)
    except APIError as e:
        if e.err_code != STREAM_NAME_IN_USE:
            raise
        return await js.object_store(name)  # another gateway made it meanwhile


async def _line_stream(js: JetStreamContext, subjects: Subjects, spec: BucketSpec, replicas: int) -> None:
    try:
        await js.stream_info(subjects.batch_lines_stream)
        return
    except NotFoundError:
        pass
    cfg = StreamConfig(
        name=subjects.batch_lines_stream,
        subjects=[subjects.batch_lines_all],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=spec.storage,
        num_replicas=replicas,
        discard=DiscardPolicy.NEW,
        max_bytes=spec.max_bytes,
        duplicate_window=DUPLICATE_WINDOW_S,
    )
    try:
        await js.add_stream(cfg)
    except APIError as e:
        if e.err_code != STREAM_NAME_IN_USE:
            raise


def _live(msg: Latest) -> bool:
    """Whether a KV message holds a value (not a delete or purge marker)."""
    return operation(msg.headers) is None and bool(msg.data)


class BatchStore:
    """The Batch API's state in JetStream; every method is one or a few JetStream calls."""

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        files: ObjectStore,
        batches: KeyValue,
        results: KeyValue,
        max_payload: int,
    ) -> None:
        self.js = js
        self.subjects = subjects
        self._files = files
        self._batches = batches
        self._results = results
        self._room = max(max_payload - ENVELOPE_BYTES, 1024)  # a larger line or result is spilled

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        subjects: Subjects,
        *,
        max_payload: int,
        replicas: int = 1,
        create: bool = True,
    ) -> BatchStore:
        """Open the stores, creating what does not exist yet (idempotent across gateways); with
        ``create`` off, `Missing` until someone made them (the files store is made first).
        ``max_payload``: the largest message the NATS server takes (its INFO says)."""
        s = BATCH_STORES
        files = await _object_store(js, subjects.files_store, s["files"], replicas, create)
        batches = await open_bucket(js, subjects.batches_bucket, s["batches"], replicas=replicas)
        results = await open_bucket(js, subjects.batch_results_bucket, s["batchresults"], replicas=replicas)
        await _line_stream(js, subjects, s["batchlines"], replicas)
        return cls(js, subjects, files, batches, results, max_payload)

    # -- files -------------------------------------------------------------------------------------
    async def put_file(self, file_id: str, data: bytes, meta: FileMeta) -> FileObject:
        description = msgspec.json.encode(meta).decode()
        await self._files.put(file_id, data, meta=ObjectMeta(name=file_id, description=description))
        return _file_object(file_id, len(data), meta)

    async def file(self, file_id: str) -> tuple[FileObject, FileMeta] | None:
        """A file and its meta; None if there is none, or it has expired (the sweep deletes it)."""
        try:
            info = await self._files.get_info(file_id)
        except ObjectNotFoundError:
            return None
        meta = _meta_of(info.description)
        if meta is None or meta.expired(now()):
            return None
        return _file_object(file_id, info.size or 0, meta), meta

    async def file_data(self, file_id: str) -> bytes | None:
        try:
            got = await self._files.get(file_id)
        except ObjectNotFoundError:
            return None
        meta = _meta_of(got.info.description)
        return bytes(got.data or b"") if meta is not None and not meta.expired(now()) else None

    async def files(self, *, expired: bool = False) -> list[tuple[FileObject, FileMeta]]:
        """Every file that has not expired (with ``expired``: every file that has)."""
        return _files_in(await self._objects(), expired)

    async def leftovers(self) -> tuple[list[FileObject], list[tuple[str, str]]]:
        """For the sweep, from one reading of the store: the files past their expiry, and `spills`."""
        objects = await self._objects()
        return [f for f, _ in _files_in(objects, expired=True)], _spills_in(objects)

    async def _objects(self) -> list[ObjectInfo]:
        """The record of every object in the files store (deleted ones' included)."""
        store = self.subjects.files_store
        msgs = await latest_per_subject(
            self.js, self.subjects.object_stream(store), f"$O.{store}.M.>", timeout=READ_TIMEOUT_S
        )
        return [ObjectInfo.from_response(json.loads(m.data)) for m in msgs]

    async def delete_file(self, file_id: str) -> bool:
        try:
            await self._files.delete(file_id)
        except ObjectNotFoundError:
            return False
        return True

    # -- batch records -----------------------------------------------------------------------------
    async def create_batch(self, record: BatchRecord) -> None:
        await kv_create(self._batches, record.batch.id, msgspec.json.encode(record))

    async def batch(self, batch_id: str) -> Stored | None:
        try:
            entry = await self._batches.get(batch_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return Stored(record_decoder.decode(entry.value), entry.revision or 0)

    async def change(self, batch_id: str, step: Callable[[BatchRecord], BatchRecord]) -> BatchRecord | None:
        """Apply ``step`` to the batch by compare-and-set, reading again after each lost race; the
        record written (or read, when ``step`` changed nothing); None for an unknown batch. Whatever
        ``step`` raises (`corral.gateway.batch.model.Refused`) reaches the caller."""
        for _ in range(CAS_TRIES):
            stored = await self.batch(batch_id)
            if stored is None:
                return None
            new = step(stored.record)
            if new == stored.record:
                return new
            try:
                await self._batches.update(batch_id, msgspec.json.encode(new), last=stored.revision)
            except KeyWrongLastSequenceError:
                continue
            return new
        raise Conflict(f"batch {batch_id} changed under {CAS_TRIES} compare-and-sets in a row")

    async def batches(self) -> list[Stored]:
        """Every batch record, with its revision."""
        bucket = self.subjects.batches_bucket
        msgs = await latest_per_subject(
            self.js,
            self.subjects.kv_stream(bucket),
            self.subjects.kv_key(bucket, ">"),
            timeout=READ_TIMEOUT_S,
        )
        return [Stored(record_decoder.decode(m.data), m.seq) for m in msgs if _live(m)]

    # -- lines and results -------------------------------------------------------------------------
    async def queue_lines(self, batch_id: str, lines: list[tuple[str, bytes]], url: str) -> None:
        """Publish every line, `PUBLISH_WINDOW` awaiting their acks at a time."""
        subject = self.subjects.batch_line(batch_id)

        async def one(index: int, custom_id: str, body: bytes) -> None:
            line = Line(batch=batch_id, index=index, custom_id=custom_id, url=url, body=msgspec.Raw(body))
            data = msgspec.json.encode(line)
            if len(data) > self._room:  # the body waits in the object store (chunked), the line refers to it
                try:  # one name a line: a validation redone replaces it, never copies it
                    line.spilled = await self._spill(f"{batch_id}{SPILL}line.{index}", body)
                except APIError as e:
                    raise SpillRefused(
                        f"Line {index + 1} ({len(body):,} bytes) is larger than a NATS message and the "
                        f"files store refused to keep it: {e.description or e}"
                    ) from e
                line.body = msgspec.Raw(b"null")
                data = msgspec.json.encode(line)
            headers = {"Nats-Msg-Id": f"{batch_id}.{index}"}
            await self.js.publish(subject, data, headers=headers)

        for start in range(0, len(lines), PUBLISH_WINDOW):
            part = lines[start : start + PUBLISH_WINDOW]
            await asyncio.gather(*(one(start + i, c, b) for i, (c, b) in enumerate(part)))

    async def line_body(self, line: Line) -> bytes:
        """A line's request body, from the object store where it was too big for the line."""
        if not line.spilled:
            return bytes(line.body)
        got = await self._files.get(line.spilled)  # ObjectNotFoundError once the batch is dropped
        return bytes(got.data or b"")

    async def store_result(self, batch_id: str, index: int, result: LineResult) -> LineResult:
        """Keep a line's result unless it has one already; the result it has (one too big for a
        message is kept in the object store, its entry a reference holding the status)."""
        key, name = f"{batch_id}.{index}", ""
        data = msgspec.json.encode(result)
        if len(data) > self._room:
            name = await self._spill(f"{batch_id}{SPILL}result.{index}.{secrets.token_hex(4)}", data)
            ref = LineResult(custom_id=result.custom_id, status=result.status, request_id=result.request_id)
            ref.spilled = name
            data = msgspec.json.encode(ref)
        try:
            await kv_create(self._results, key, data)
        except KeyWrongLastSequenceError:
            if name:  # another run's result came first: ours goes
                await self.forget(name)
            entry = await self._results.get(key)
            result = result_decoder.decode(entry.value or b"")
        if not result.ok:  # also when an earlier writer died before marking it
            try:
                await kv_create(self._results, f"{batch_id}.f.{index}", b"")
            except KeyWrongLastSequenceError:
                pass
        return result

    async def _count(self, keys: str) -> int:
        stream = self.subjects.kv_stream(self.subjects.batch_results_bucket)
        subject = self.subjects.kv_key(self.subjects.batch_results_bucket, keys)
        info = await self.js.stream_info(stream, subjects_filter=subject)
        return len(info.state.subjects or {})

    async def lines_waiting(self, batch_id: str) -> int:
        """Lines of the batch not yet acknowledged (queued, running or handed back for a later run):
        one subject of the line stream, so cheap whatever the batch's size, unlike `done_count`."""
        subject = self.subjects.batch_line(batch_id)
        info = await self.js.stream_info(self.subjects.batch_lines_stream, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())

    async def done_count(self, batch_id: str) -> int:
        """How many lines of the batch have their result."""
        return await self._count(f"{batch_id}.*")

    async def failed_count(self, batch_id: str) -> int:
        return await self._count(f"{batch_id}.f.*")

    async def results(self, batch_id: str, total: int) -> list[LineResult] | None:
        """Every line's result in input order; None while some line has none."""
        bucket = self.subjects.batch_results_bucket
        subject = self.subjects.kv_key(bucket, f"{batch_id}.*")
        found: dict[int, LineResult] = {}
        stream = self.subjects.kv_stream(bucket)
        for msg in await latest_per_subject(self.js, stream, subject, timeout=READ_TIMEOUT_S):
            if _live(msg):
                found[int(msg.subject.rsplit(".", 1)[1])] = result_decoder.decode(msg.data)
        if any(i not in found for i in range(total)):
            return None
        for i, result in found.items():
            if result.spilled:
                try:
                    got = await self._files.get(result.spilled)
                except ObjectNotFoundError:
                    return None  # another gateway finished the batch and dropped it meanwhile
                found[i] = result_decoder.decode(got.data or b"")
        return [found[i] for i in range(total)]

    async def drop_results(self, batch_id: str) -> None:
        """Forget a finished batch's results, and the lines and results it kept as objects: its
        files hold them now."""
        stream = self.subjects.kv_stream(self.subjects.batch_results_bucket)
        subject = self.subjects.kv_key(self.subjects.batch_results_bucket, f"{batch_id}.>")
        await self.js.purge_stream(stream, subject=subject)
        for name, owner in await self.spills():
            if owner == batch_id:
                await self.forget(name)

    async def spills(self) -> list[tuple[str, str]]:
        """(name, batch id) of every object a batch keeps of its own (a line or result too big for a
        message), for the batch's end and for the sweep (one a gateway died before deleting)."""
        return _spills_in(await self._objects())

    async def forget(self, name: str) -> None:
        """Delete a batch's own object, and its record too: the store would keep the deleted
        object's record for good, and every listing reads it."""
        with contextlib.suppress(ObjectNotFoundError):
            await self._files.delete(name)
        meta = f"$O.{self.subjects.files_store}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        await self.js.purge_stream(self.subjects.object_stream(self.subjects.files_store), subject=meta)

    async def _spill(self, name: str, data: bytes) -> str:
        """Keep ``data`` as an object of the batch's own (no file: never listed); its name."""
        await self._files.put(name, data)
        return name


def _files_in(objects: list[ObjectInfo], expired: bool) -> list[tuple[FileObject, FileMeta]]:
    """The files among ``objects`` that have not expired (with ``expired``: that have)."""
    out = []
    t = now()
    for info in objects:
        if SPILL in info.name:
            continue  # a batch's own, not a file
        meta = _meta_of(info.description)
        if meta is not None and not info.deleted and meta.expired(t) == expired:
            out.append((_file_object(info.name, info.size or 0, meta), meta))
    return out


def _spills_in(objects: list[ObjectInfo]) -> list[tuple[str, str]]:
    """(name, batch id) of the batches' own objects among ``objects``."""
    return [(i.name, i.name.split(SPILL, 1)[0]) for i in objects if SPILL in i.name and not i.deleted]


def _meta_of(description: str | None) -> FileMeta | None:
    try:
        return file_meta_decoder.decode(description or "")
    except (msgspec.DecodeError, json.JSONDecodeError):
        log.warning("a file in the files store has no readable description: not shown")
        return None


def _file_object(file_id: str, size: int, meta: FileMeta) -> FileObject:
    return FileObject(
        id=file_id,
        bytes=size,
        created_at=meta.created_at,
        filename=meta.filename,
        purpose=meta.purpose,
        expires_at=meta.expires_at,
    )
