"""Stopping background tasks for certain.

nats-py swallows a `asyncio.CancelledError` that lands while a publish hands its buffer to the
flusher (`Client._flush_pending` catches it and returns). A task cancelled at that moment runs on
to its next await — a KV watch, an event — and waits there for ever, and whoever awaits it hangs
with it. `cancel_and_wait` therefore cancels again until each task has ended.

And asyncio never runs the body of a task cancelled before its first step, not even its
``finally``: a task made a moment ago, cancelled at once, ends without the cleanup it was written
with (a reply it would end, a slot it would free). `cancel_and_wait` lets every task take its first
step before it cancels any.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import nats.errors
import nats.js.errors

log = logging.getLogger(__name__)

FIRST_WAIT_S = 1.0  # a cancelled task's time to clean up before it is cancelled again
RECANCEL_S = 0.05  # then, how often it is cancelled again


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], *, timeout: float = 10.0) -> None:
    """Cancel ``tasks`` and return once every one has ended (their results and errors are dropped);
    a task still running after ``timeout`` seconds is logged and left behind."""
    tasks = list(tasks)
    if any(not t.done() for t in tasks):
        await asyncio.sleep(0)  # one turn of the loop: a task made just now takes its first step
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    wait = FIRST_WAIT_S  # cleanup that awaits (a publish, a close) is not cut short at once
    while pending:
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("%d tasks did not end when cancelled: %s", len(pending), pending)
            return
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(wait, remaining))
        wait = RECANCEL_S
    for t in tasks:
        if not t.cancelled():
            t.exception()  # retrieved: a stopping task's error is not news


BACKOFF_FIRST_S = 0.1  # a failed loop's first restart comes this soon
BACKOFF_MAX_S = 10.0  # and a loop that keeps failing is restarted at least this often

# What a loop fails with while NATS or its JetStream is away (a restart, a cluster electing a
# leader): expected on a bad day, so one warning line, not an error with its traceback
NATS_AWAY: tuple[type[BaseException], ...] = (
    TimeoutError,  # nats-py's request timeouts are TimeoutErrors too
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.UnexpectedEOF,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    # a stream or bucket not found: a restarted NATS that lost what it kept in memory, before the
    # service made them again (`corral.runtime.buckets.Reopener`)
    nats.js.errors.NotFoundError,
)


async def supervise(
    name: str,
    loop: Callable[[], Awaitable[None]],
    *,
    first_s: float = BACKOFF_FIRST_S,
    max_s: float = BACKOFF_MAX_S,
    healthy_s: float = 30.0,
    expected: tuple[type[BaseException], ...] = (),
    wake: asyncio.Event | None = None,
) -> None:
    """Run ``loop()`` until it returns; when it raises, log it (one warning line when NATS is away,
    `NATS_AWAY`, or for an ``expected`` error, such as another engine's being away; else an error
    with its traceback) and run it again after a capped exponential backoff (reset once a run
    lasted ``healthy_s``), or as soon as ``wake`` is set (the loop's own restart event: what it
    failed on is back, such as the buckets opened again after a reconnect), the backoff reset.
    Cancellation ends it.

    For a service's long-running loops (watches, reapers): a JetStream timeout must not end one
    silently while the rest of the service keeps answering."""
    clock = asyncio.get_running_loop().time
    backoff = first_s
    while True:
        started = clock()
        try:
            await loop()
            return
        except NATS_AWAY as e:
            log.warning(
                "%s failed, NATS away (%s); restarting it in %.1fs", name, str(e) or type(e).__name__, backoff
            )
        except expected as e:
            log.warning("%s failed (%s); restarting it in %.1fs", name, str(e) or type(e).__name__, backoff)
        except Exception:
            log.exception("%s failed; restarting it in %.1fs", name, backoff)
        if clock() - started >= healthy_s:
            backoff = first_s
        if wake is not None:
            try:
                async with asyncio.timeout(backoff):  # a backoff period, cut short by the event
                    await wake.wait()
            except TimeoutError:
                pass
            else:
                backoff = first_s  # the loop clears ``wake`` as it starts again
                continue
        else:
            await asyncio.sleep(backoff)  # a backoff period, not a wait for an event
        backoff = min(backoff * 2, max_s)
