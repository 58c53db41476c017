"""Stopping background tasks for certain.

nats-py swallows a `asyncio.CancelledError` that lands while a publish hands its buffer to the
flusher (`Client._flush_pending` catches it and returns). A task cancelled at that moment runs on
to its next await — a KV watch, an event — and waits there for ever, and whoever awaits it hangs
with it. `cancel_and_wait` therefore cancels again until each task has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

FIRST_WAIT_S = 1.0  # a cancelled task's time to clean up before it is cancelled again
RECANCEL_S = 0.05  # then, how often it is cancelled again


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], *, timeout: float = 10.0) -> None:
    """Cancel ``tasks`` and return once every one has ended (their results and errors are dropped);
    a task still running after ``timeout`` seconds is logged and left behind."""
    tasks = list(tasks)
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
