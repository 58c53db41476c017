"""The steps of a batch's life that any gateway may take, each safe to take twice or to take over from
a gateway that died in the middle of it:

- `validate`: read the input file, fail the batch or queue its lines (deduplicated by message id),
  then mark it started by compare-and-set;
- `maybe_finalize`: once every line has a result, win the compare-and-set into ``finalizing`` (or, for
  a cancelling batch, ``closing``) and `write_files`;
- `write_files`: the output and error files under deterministic ids, then the final status;
- `sweep`: what every runner does periodically over all unfinished batches — finalize those whose
  lines are all done (a result stored by a gateway that died before finalizing), mark expired those
  past ``expires_at``, and take over a validation or finalization whose record has not changed for a
  lease (its gateway died). A lease is judged by when *this* gateway first saw that revision of the
  record, never by another gateway's clock. Once a minute it also deletes the files past their
  ``expires_at`` (a file is hidden from the moment it expires).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from corral.gateway.batch import model
from corral.gateway.batch.lines import assemble, common_model, parse_input
from corral.gateway.batch.model import TERMINAL, BatchError, BatchRecord, FileMeta, Refused, now
from corral.gateway.batch.store import BatchStore, Conflict, SpillRefused, Stored
from corral.runtime.nats import error_text
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """How the batch runners work. The first five are the gateway's ``batch_*`` settings
    (`corral.gateway.settings`, declared there once); the rest are fixed."""

    in_flight: int  # lines running at once, fleet-wide (the consumer's max_ack_pending)
    slots: int  # lines one gateway runs at once
    ack_wait_s: float  # a line silent this long (its gateway died) runs again elsewhere
    attempts: int  # runs of a line that fail transiently before it is an error line
    max_lines: int  # requests one input file may hold (OpenAI's bound: 50,000)
    retry_first_s: float = 1.0  # the backoff before its second run, doubling up to retry_max_s
    retry_max_s: float = 60.0
    sweep_s: float = 5.0  # how often each runner looks over the unfinished batches
    lease_s: float = 30.0  # a validation or finalization unchanged this long is taken over
    expiry_sweep_s: float = 60.0  # how often a runner deletes the files past their expires_at


class Lifecycle:
    def __init__(
        self, store: BatchStore, limits: BatchLimits, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.limits = limits
        self._clock = clock
        self._seen: dict[str, tuple[int, float]] = {}  # batch → (revision, when first seen here)
        self._next_expiry = 0.0  # when the sweep next deletes expired files

    async def validate(self, batch_id: str) -> BatchRecord | None:
        stored = await self.store.batch(batch_id)
        if stored is None:
            return None
        rec = stored.record
        if rec.total >= 0 or rec.batch.status in TERMINAL:
            return rec
        data = await self.store.file_data(rec.batch.input_file_id)
        lines: list[tuple[str, bytes]]
        if data is None:
            lines, errors = [], [BatchError(code="invalid_file", message="The input file no longer exists.")]
        else:
            lines, errors = parse_input(data, rec.batch.endpoint, max_lines=self.limits.max_lines)
        try:
            if not errors:
                try:
                    await self.store.queue_lines(batch_id, lines, rec.batch.endpoint)
                except SpillRefused as e:  # lines queued so far are dropped: the batch has failed
                    errors = [BatchError(code="too_large", message=str(e))]
            if errors:
                return await self.store.change(batch_id, lambda r: model.failed(r, errors, now()))
            total, named = len(lines), common_model(lines)
            changed = await self.store.change(
                batch_id, lambda r: r if r.total >= 0 else model.queued(r, total, now(), named)
            )
        except Refused as e:  # another gateway's validation ended it first
            log.info("batch %s: validation overtaken: %s", batch_id, e)
            stored = await self.store.batch(batch_id)
            return stored.record if stored is not None else None
        await self.maybe_finalize(batch_id)
        return changed

    async def maybe_finalize(self, batch_id: str) -> None:
        """Finalize the batch if every line has its result and nobody has taken that yet."""
        stored = await self.store.batch(batch_id)
        if stored is None:
            return
        rec = stored.record
        if rec.total < 0 or rec.closing or rec.batch.status not in ("in_progress", "cancelling"):
            return
        # a line is acknowledged only once its result is stored: while any is not, the batch is not
        # done, and the count of results (one entry per line) need not be read
        if await self.store.lines_waiting(batch_id) or await self.store.done_count(batch_id) < rec.total:
            return
        try:
            taken = await self.store.change(batch_id, lambda r: model.finalize(r, now()))
        except Refused:
            return  # another runner took it
        if taken is not None:
            await self.write_files(taken)

    async def write_files(self, rec: BatchRecord) -> None:
        batch_id = rec.batch.id
        results = await self.store.results(batch_id, rec.total)
        if results is None:
            again = await self.store.batch(batch_id)
            if again is not None and again.record.batch.status not in TERMINAL:  # the sweep tries again
                log.error("batch %s is finalizing but some line has no result", batch_id)
            return  # else another gateway finished it and dropped the results meanwhile
        output, errors, counts, usage = assemble(batch_id, results)
        ids: dict[str, str | None] = {}
        for kind, data in (("output", output), ("error", errors)):
            file_id = model.output_file_id(batch_id, kind)  # type: ignore[arg-type]
            ids[kind] = file_id if data else None
            if data and await self.store.file(file_id) is None:
                created = now()
                meta = FileMeta(
                    filename=f"{batch_id}_{kind}.jsonl",
                    purpose="batch_output",
                    created_at=created,
                    owner=rec.owner,
                    expires_at=FileMeta.expiry(created, rec.output_expires_s),
                )
                await self.store.put_file(file_id, data, meta)
        try:
            await self.store.change(
                batch_id, lambda r: model.finished(r, counts, ids["output"], ids["error"], now(), usage)
            )
        except Refused:
            return  # a gateway that took it over finished it first
        self._seen.pop(batch_id, None)
        await self.store.drop_results(batch_id)
        log.info("batch %s finished: %d lines, %d failed", batch_id, counts.total, counts.failed)

    async def delete_expired_files(self) -> None:
        """Delete the files past their ``expires_at`` (hidden from the moment they expire), and the
        objects a batch kept of its own once it has ended (a gateway died before deleting them)."""
        expired, spills = await self.store.leftovers()
        for f in expired:
            if await self.store.delete_file(f.id):
                log.info("file %s expired and was deleted", f.id)
        for name, batch_id in spills:
            stored = await self.store.batch(batch_id)
            if stored is None or stored.record.batch.status in TERMINAL:
                await self.store.forget(name)

    # -- the sweep ---------------------------------------------------------------------------------
    def _stuck(self, stored: Stored) -> bool:
        """Whether this revision of the record has been seen here, unchanged, for a lease."""
        batch_id = stored.record.batch.id
        seen = self._seen.get(batch_id)
        if seen is None or seen[0] != stored.revision:
            self._seen[batch_id] = (stored.revision, self._clock())
            return False
        return self._clock() - seen[1] >= self.limits.lease_s

    async def sweep(self) -> None:
        if self._clock() >= self._next_expiry:
            self._next_expiry = self._clock() + self.limits.expiry_sweep_s
            try:
                await self.delete_expired_files()
            except (NatsError, JetStreamError, TimeoutError) as e:
                log.warning("deleting expired files failed (%s); the next sweep tries again", error_text(e))
        for stored in await self.store.batches():
            rec = stored.record
            if rec.batch.status in TERMINAL:
                self._seen.pop(rec.batch.id, None)
                continue
            try:
                await self._tend(stored)
            except (NatsError, JetStreamError, TimeoutError, Conflict) as e:
                log.warning(
                    "batch %s: sweep step failed (%s); next sweep tries again", rec.batch.id, error_text(e)
                )

    async def _tend(self, stored: Stored) -> None:
        rec = stored.record
        batch_id = rec.batch.id
        if rec.total < 0:  # validating (or cancelled while validating)
            if self._stuck(stored):
                log.warning("batch %s: taking over its validation", batch_id)
                await self.validate(batch_id)
        elif rec.batch.status == "finalizing" or rec.closing:
            if self._stuck(stored):
                log.warning("batch %s: taking over the writing of its files", batch_id)
                await self.write_files(rec)
        elif rec.batch.status == "in_progress" and not rec.ending and now() >= rec.batch.expires_at:
            try:
                await self.store.change(batch_id, model.expire)
                log.info("batch %s expired: its remaining lines end as batch_expired", batch_id)
            except Refused:
                pass
        else:
            await self.maybe_finalize(batch_id)
