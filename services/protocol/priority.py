"""Request priority: ``interactive`` (the default) or ``batch``.

Batch work runs on the same fleet but only in slots no interactive request is waiting for: it is
claimed on the ``.batch`` claim subjects, which an agent arms only for the slots it can spare, and
waits in its own lane of the fleet queue, taken after that model's interactive lane (see
`corral.protocol.subjects.Subjects.work` and ``queue``). A client asks with the HTTP header
``X-Corral-Priority``; an API key may cap what its requests get.
"""

from __future__ import annotations

from typing import Final, Literal

from corral.protocol.errors import BadRequest

Priority = Literal["interactive", "batch"]
PRIORITIES: Final[tuple[Priority, ...]] = ("interactive", "batch")  # highest first
INTERACTIVE: Final[Priority] = "interactive"
BATCH: Final[Priority] = "batch"
HTTP_HEADER: Final = b"x-corral-priority"


def parse_priority(raw: str) -> Priority:
    """A priority as a client wrote it (any case, surrounding blanks); `BadRequest` otherwise."""
    value = raw.strip().lower()
    if value == INTERACTIVE:
        return INTERACTIVE
    if value == BATCH:
        return BATCH
    raise BadRequest(f"invalid X-Corral-Priority {raw!r}: use interactive or batch")


def capped(asked: Priority | None, cap: Priority) -> Priority:
    """What a request gets: what it asked for (``cap`` when it did not ask), never above ``cap``."""
    if asked is None:
        return cap
    return asked if PRIORITIES.index(asked) >= PRIORITIES.index(cap) else cap
