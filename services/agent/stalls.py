"""Streamed requests whose Ollama went silent: `Stalls`, pure, looked at on each refresh.

Ollama streams a token at a time, so a stream that sends nothing for minutes is stuck (a wedged
runner, while the server still answers `/api/ps`): before its first token (once its model is
loaded: the prompt) or between two. Nothing bounds such a wait in Ollama once its load is done,
and nothing here would notice: the agent's readings of that Ollama come back fine. An unstreamed request is not judged:
its whole answer comes at once, after however long the generation takes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol, TypeVar


class Watched(Protocol):
    """What is read of a job (`corral.agent.worker.Job`)."""

    @property
    def rid(self) -> str: ...

    @property
    def streams(self) -> bool: ...  # its body asks Ollama to stream the answer

    @property
    def token(self) -> str | None: ...  # its model's token

    @property
    def held(self) -> bool: ...  # its reply waits for its requester to read: Ollama is not asked

    started: bool
    ran_from: float  # monotonic, when it began to run
    last_bytes: bytes  # a new object with each chunk from its Ollama


W = TypeVar("W", bound=Watched)


class Stalls:
    """Which running streamed jobs have heard nothing from their Ollama for ``limit_s`` (0: none
    ever). Each look notes, per job, the last chunk it had and since when it has not changed, so
    nothing is timed per chunk; a stall is seen at most one look late."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._seen: dict[str, tuple[bytes, float]] = {}  # rid → (its last chunk, unchanged since)

    def look(self, jobs: Iterable[W], now: float, ready: Collection[str]) -> list[W]:
        """The streamed jobs silent for the limit as of ``now``. Before its first bytes a job's
        silence counts only once its model is ``ready`` (tokens Ollama finished loading): a load
        takes what it takes (Ollama bounds one that stops progressing itself)."""
        if not self.limit_s:
            return []
        seen: dict[str, tuple[bytes, float]] = {}
        stalled = []
        for job in jobs:
            if not (job.streams and job.started and job.ran_from):
                continue
            before = self._seen.get(job.rid)
            since = before[1] if before is not None and before[0] is job.last_bytes else now
            if job.held:
                since = now  # its requester reads slowly: the agent, not Ollama, holds the stream back
            elif not job.last_bytes and job.token not in ready:
                since = now  # its model still loads: not a silence yet
            elif before is None and not job.last_bytes:  # nothing yet: silent since it began to run
                since = job.ran_from
            seen[job.rid] = (job.last_bytes, since)
            if now - since >= self.limit_s:
                stalled.append(job)
        self._seen = seen
        return stalled
