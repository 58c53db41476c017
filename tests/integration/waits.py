"""The one bounded wait of the tests: until a condition holds, checked again on each change that
could make it hold (a fleet view's change, a KV watch entry, a line a process wrote), and failing
after its timeout with what it waited for."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import linecache
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corral.runtime.fleet import FleetView

Wake = Callable[[float], Awaitable[object]]
"""Returns on the next change that may matter, or after at most the seconds it is given."""


async def until(
    holds: Callable[[], bool | Awaitable[bool]],
    wake: Wake,
    *,
    timeout: float,
    what: str = "",
    state: Callable[[], object] | None = None,
) -> None:
    """Wait until ``holds()`` is true, checking it again each time ``wake(seconds left)`` returns
    (a change, its own bound, or the deadline, which also bounds a ``wake`` that ignores it), and
    once more at the deadline. After ``timeout`` seconds raise `TimeoutError` naming ``what`` (by
    default the line of source that defines ``holds``) and, if given, ``state()`` as last seen."""
    deadline = time.monotonic() + timeout
    while not await _check(holds):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            seen = f"; last seen: {state()}" if state is not None else ""
            raise TimeoutError(f"not within {timeout}s: {what or describe(holds)}{seen}")
        with contextlib.suppress(TimeoutError):  # a wake out of time: the loop checks once more
            async with asyncio.timeout(remaining):
                await wake(remaining)


async def views_hold(
    views: Iterable[FleetView], holds: Callable[[FleetView], bool], *, timeout: float, what: str = ""
) -> None:
    """`until` ``holds(view)`` for each fleet view in turn (woken by its changes), within ``timeout``
    in all."""
    deadline = time.monotonic() + timeout
    for view in views:
        await until(
            functools.partial(holds, view),
            view.wait_changed,
            timeout=max(0.0, deadline - time.monotonic()),
            what=what or describe(holds),
        )


class Changes:
    """A signal for `until` to wake on, set by whatever changes the state it checks. Its `wait`
    clears it first, so a change between a (synchronous) check and the wait is never missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        self._event.clear()
        await asyncio.wait_for(self._event.wait(), timeout)


async def _check(holds: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = holds()
    return await result if inspect.isawaitable(result) else result


def describe(fn: Callable[..., object]) -> str:
    """The source line that defines ``fn`` (a lambda's says what it checks), else its name."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return repr(fn)
    line = linecache.getline(code.co_filename, code.co_firstlineno).strip()
    return line or f"{getattr(fn, '__qualname__', fn)} ({code.co_filename}:{code.co_firstlineno})"
