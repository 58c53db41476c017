"""cancel_and_wait: tasks that swallow a cancellation (as nats-py's publish path does) still end,
and a task made a moment ago runs its cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
import nats.js.errors
import pytest
from corral.runtime.tasks import cancel_and_wait, supervise


async def test_a_task_that_swallows_one_cancellation_is_cancelled_again() -> None:
    parked, moved_on = asyncio.Event(), asyncio.Event()
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        try:
            parked.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:  # what nats-py's _flush_pending does
            swallowed += 1
        moved_on.set()
        await asyncio.Event().wait()  # on to the next await, as a watch loop would

    task = asyncio.create_task(stubborn())
    await parked.wait()
    task.cancel()
    await moved_on.wait()
    assert not task.done()  # one cancel was not enough: the hang the helper exists for
    await asyncio.wait_for(cancel_and_wait([task]), 5)
    assert task.cancelled() and swallowed == 1


async def test_errors_and_finished_tasks_are_taken_quietly() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails())
    done = asyncio.create_task(asyncio.sleep(0))
    await asyncio.wait({failed, done})
    sleeper = asyncio.create_task(asyncio.Event().wait())
    await cancel_and_wait([failed, done, sleeper])
    assert sleeper.cancelled() and isinstance(failed.exception(), RuntimeError)


async def test_a_task_that_will_not_end_is_left_behind_after_the_timeout() -> None:
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    task = asyncio.create_task(deaf())
    await asyncio.wait_for(cancel_and_wait([task], timeout=0.2), 5)
    assert not task.done()
    release.set()
    await task


async def test_a_supervised_watch_is_opened_again_after_a_restart() -> None:
    """`watch_until` returns when its restart is set; `watch_forever` keeps watching, so a
    supervised watch does not end on the first reconnect (a revoked API key, a policy edit or a
    pin made after it would go unseen)."""
    from corral.runtime.kvwatch import watch_forever

    restart = asyncio.Event()
    opened: asyncio.Queue[int] = asyncio.Queue()
    runs = 0

    async def watch() -> None:
        nonlocal runs
        runs += 1
        opened.put_nowait(runs)
        await asyncio.Event().wait()  # a watch that hears nothing more until it is replaced

    task = asyncio.create_task(supervise("a watch", lambda: watch_forever(watch, restart)))
    try:
        async with asyncio.timeout(5):
            assert await opened.get() == 1
            restart.set()
            assert await opened.get() == 2
            restart.set()
            assert await opened.get() == 3
        assert not task.done()
    finally:
        await cancel_and_wait([task])


async def test_a_task_made_just_now_runs_its_cleanup_when_cancelled() -> None:
    """Cancelled before its first step, asyncio would run none of its body, `finally` included."""
    cleaned = False

    async def with_cleanup() -> None:
        nonlocal cleaned
        try:
            await asyncio.Event().wait()
        finally:
            cleaned = True

    task = asyncio.create_task(with_cleanup())
    await cancel_and_wait([task])  # awaited directly: no turn of the loop before it is called
    assert task.cancelled() and cleaned


async def test_a_loop_failing_while_nats_is_away_logs_one_line_and_a_bug_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A NATS restart fails every loop that asks NATS anything: one warning line each, which an
    operator reads as the outage it is; any other failure is an error with its traceback."""
    failures: list[Exception] = [
        nats.errors.TimeoutError(),
        nats.errors.ConnectionClosedError(),
        nats.js.errors.NotFoundError(
            description="stream not found"
        ),  # a restarted NATS, buckets not made yet
        ValueError("bug"),
    ]

    async def loop() -> None:
        if failures:
            raise failures.pop(0)

    with caplog.at_level(logging.WARNING, logger="corral.runtime.tasks"):
        async with asyncio.timeout(10):
            await supervise("a loop", loop, first_s=0.0)
    records = [(r.levelname, r.exc_info is not None, r.getMessage()) for r in caplog.records]
    assert [(level, traced) for level, traced, _ in records] == [
        ("WARNING", False),
        ("WARNING", False),
        ("WARNING", False),
        ("ERROR", True),
    ], records
    assert "NATS away (nats: timeout)" in records[0][2]


async def test_an_expected_failure_of_another_engine_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """A Docker engine that is not there yet fails its watch at every try: one line a try, not a
    traceback, while an unexpected error still brings its traceback."""
    failures: list[Exception] = [ConnectionRefusedError("no engine"), ValueError("bug")]

    async def loop() -> None:
        if failures:
            raise failures.pop(0)

    with caplog.at_level(logging.WARNING, logger="corral.runtime.tasks"):
        async with asyncio.timeout(10):
            await supervise("the watch", loop, first_s=0.0, expected=(OSError,))
    records = [(r.levelname, r.exc_info is not None, r.getMessage()) for r in caplog.records]
    assert [(level, traced) for level, traced, _ in records] == [("WARNING", False), ("ERROR", True)]
    assert records[0][2] == "the watch failed (no engine); restarting it in 0.0s"


async def test_a_failed_loop_starts_again_when_woken_not_at_the_end_of_its_backoff() -> None:
    """A watch that failed while NATS was away waits out its backoff (up to 10 s) unless its restart
    event says the buckets are open again: then it starts at once, its backoff back to the first."""
    wake = asyncio.Event()
    runs: list[asyncio.Event] = [asyncio.Event() for _ in range(3)]

    async def loop() -> None:
        n = sum(r.is_set() for r in runs)
        runs[n].set()
        if n < 2:
            wake.clear()  # as a watch clears its restart event when it starts
            raise nats.errors.TimeoutError

    task = asyncio.create_task(supervise("a watch", loop, first_s=3600.0, max_s=3600.0, wake=wake))
    try:
        async with asyncio.timeout(10):
            await runs[0].wait()
            wake.set()  # the buckets are open again: the hour's backoff is cut short
            await runs[1].wait()
            wake.set()
            await runs[2].wait()
            await task  # the third run returned: the loop ended
    finally:
        await cancel_and_wait([task])
