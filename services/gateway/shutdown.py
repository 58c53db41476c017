"""A gateway's stop in two steps, so that no request it holds ends without a word.

When the process is asked to stop (SIGTERM, Ctrl-C) the HTTP server stops accepting and lets open
requests finish within its grace. `Shutdown.begin` marks the two moments:

- **draining**, at once: the stop has begun; requests an agent is serving go on, and those waiting
  for a slot (in the fleet queue or at an agent) wait on, to be served within the grace (its clients
  seldom retry another gateway by themselves);
- **closing**, a little before the grace runs out: a request still running is cancelled at its
  agent and ends in words — a stream with a last ``{"error": ...}`` line (a ``data:`` event on
  ``/v1``), an answer not begun (still queued, say) with ``503`` "server shutting down" — instead
  of being cut off by the server.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final

MARGIN_S: Final = 2.0  # closing comes this long before the HTTP server's grace runs out
MESSAGE: Final = "server shutting down"


class Shutdown:
    """The two moments as futures every relay may wait on at once (no task of its own per request);
    made in the running loop, the first time one is asked for."""

    def __init__(self) -> None:
        self._draining: asyncio.Future[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def draining(self) -> asyncio.Future[None]:
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_future()
        return self._draining

    @property
    def closing(self) -> asyncio.Future[None]:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
        return self._closing

    def begin(self, grace_s: float) -> None:
        """The stop has begun; the HTTP server cuts what is left after ``grace_s``."""
        if self.draining.done():
            return
        self.draining.set_result(None)
        if math.isfinite(grace_s):  # else the server waits for every request: nothing is cut
            self._timer = asyncio.get_running_loop().call_later(max(grace_s - MARGIN_S, 0.0), self._close)

    def _close(self) -> None:
        if not self.closing.done():
            self.closing.set_result(None)

    def cancel(self) -> None:
        """The timer, when the stop ends before it fires."""
        if self._timer is not None:
            self._timer.cancel()
