"""The slot time each model's requests have held on this agent: `SlotTime`, pure (each request's
seconds are passed in).

Published in the agent's state as ``slot_s`` (model key → seconds since the agent started): the
finished requests' time in a slot plus the running ones' so far, so a stream that runs for minutes
shows in every reading, not only once it ends. A reader takes the difference between two readings
of one agent: what each model ran there between them (`corral.routing.demand.SlotTimeReadings`). A
request counts from when it was sent to Ollama (a load it waits for included) to its end.
"""

from __future__ import annotations

from collections.abc import Iterable

from corral.protocol.names import decode_token

__all__ = ["SlotTime"]


class SlotTime:
    """Slot-seconds per model token: those of finished requests, kept; running ones, added on
    reading. A request's seconds move from running to finished in one step (`ended` when the caller
    stops listing it as running), so the totals never go back."""

    def __init__(self) -> None:
        self._done: dict[str, float] = {}  # model token → slot-seconds of its finished requests

    def ended(self, token: str | None, seconds: float) -> None:
        """A request of ``token`` left its slot after ``seconds`` there (None: it held none)."""
        if token is not None and seconds > 0:
            self._done[token] = self._done.get(token, 0.0) + seconds

    def totals(self, running: Iterable[tuple[str | None, float]]) -> dict[str, float]:
        """Model key → slot-seconds so far; ``running``: (token or None, seconds in its slot so
        far) of each request running now."""
        out = dict(self._done)
        for token, seconds in running:
            if token is not None and seconds > 0:
                out[token] = out.get(token, 0.0) + seconds
        return {decode_token(t): round(s, 3) for t, s in out.items()}
