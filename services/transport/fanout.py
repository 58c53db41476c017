"""One request to many agents at once, every reply owned: `fan_out`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from corral.protocol.errors import CorralError
from corral.transport.reply import Reply

A = TypeVar("A")
T = TypeVar("T")


async def fan_out(
    targets: Sequence[A],
    open_reply: Callable[[A], Awaitable[Reply]],
    read: Callable[[Reply], Awaitable[T]],
    *,
    tolerate: tuple[type[Exception], ...] = (CorralError,),
) -> list[T | Exception]:
    """Open a reply per target (``open_reply``) and ``read`` each, all at once in one task group.

    Returns, per target and in order, what ``read`` returned or the tolerated error that opening or
    reading raised (by default a `CorralError`: the agent was busy, silent or failed). Every reply
    is closed when its read ends, however it ends: its call is released and, if its stream had not
    ended, its agent told to cancel. Any other error cancels the reads still running (closing their
    replies the same way) and is raised once all of them are closed.
    """
    results: list[T | Exception] = []

    async def one(i: int, target: A) -> None:
        try:
            async with await open_reply(target) as reply:
                results[i] = await read(reply)
        except tolerate as e:
            results[i] = e

    results.extend(CorralError("not attempted") for _ in targets)
    try:
        async with asyncio.TaskGroup() as tg:
            for i, target in enumerate(targets):
                tg.create_task(one(i, target))
    except BaseExceptionGroup as group:  # the first failure, as if the reads ran one by one
        raise group.exceptions[0] from None
    return results
