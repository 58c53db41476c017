"""Scaled time. Every simulated delay goes through one `Clock` so `time_scale` governs them all.

``time_scale=0.01`` makes everything 100× faster; ``0`` removes every delay (work still yields to
the loop once per step so streams interleave). Timers (keep_alive, VRAM release) are loop
callbacks, never polling loops. With ``time_scale=0`` a positive keep_alive never fires: models stay
loaded until evicted or explicitly unloaded, which is what benchmarks want.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable


class Clock:
    __slots__ = ("scale",)

    def __init__(self, time_scale: float) -> None:
        self.scale = time_scale

    def real(self, seconds: float) -> float:
        """Simulated seconds → wall-clock seconds."""
        return seconds * self.scale

    def simulated(self, real_seconds: float) -> float:
        """Wall-clock seconds → simulated seconds (0 when time does not run)."""
        return real_seconds / self.scale if self.scale > 0 else 0.0

    async def sleep(self, seconds: float) -> None:
        d = seconds * self.scale
        await asyncio.sleep(d if d > 0 else 0)

    def timer(
        self, seconds: float, callback: Callable[[], None]
    ) -> asyncio.TimerHandle | asyncio.Handle | None:
        """Run `callback` after `seconds` of simulated time; None when it never fires."""
        loop = asyncio.get_running_loop()
        if seconds <= 0:
            return loop.call_soon(callback)
        if math.isinf(seconds) or self.scale == 0:
            return None
        return loop.call_later(seconds * self.scale, callback)

    def deadline(self, seconds: float) -> float:
        """The wall-clock time (epoch seconds) at which a timer of `seconds` set now fires."""
        if math.isinf(seconds):
            return math.inf
        return time.time() + (seconds * self.scale if self.scale > 0 else seconds)
