"""`Stalls`: which streamed requests their Ollama has sent nothing for the limit, judged from the
last chunk each had at each look (nothing is timed per chunk)."""

from __future__ import annotations

from dataclasses import dataclass

from corral.agent.stalls import Stalls

READY = frozenset({"m"})  # tokens of the models loaded


@dataclass(eq=False)
class Job:
    rid: str
    streams: bool = True
    started: bool = True
    ran_from: float = 100.0
    last_bytes: bytes = b""
    token: str | None = "m"
    held: bool = False


def test_a_stream_silent_since_it_began_is_caught_at_the_first_look_past_the_limit() -> None:
    stalls = Stalls(10.0)
    job = Job("a")
    assert stalls.look([job], 105.0, READY) == []
    assert stalls.look([job], 110.0, READY) == [job]  # nothing since it began to run, at 100


def test_each_chunk_starts_the_silence_again() -> None:
    stalls = Stalls(10.0)
    job = Job("a", last_bytes=b"x")
    assert stalls.look([job], 101.0, READY) == []  # first seen with bytes: silent from this look
    job.last_bytes = b"y"  # a new chunk
    assert stalls.look([job], 110.0, READY) == []
    assert stalls.look([job], 119.0, READY) == []
    assert stalls.look([job], 120.0, READY) == [job]  # unchanged since the look at 110


def test_unstreamed_waiting_and_unlimited_are_never_judged() -> None:
    unstreamed, waiting = Job("a", streams=False), Job("b", started=False, ran_from=0.0)
    stalls = Stalls(1.0)
    assert stalls.look([unstreamed, waiting], 1e6, READY) == []
    assert Stalls(0.0).look([Job("c")], 1e6, READY) == []


def test_a_job_gone_is_forgotten() -> None:
    stalls = Stalls(10.0)
    a, b = Job("a", last_bytes=b"x"), Job("b", last_bytes=b"x")
    stalls.look([a, b], 101.0, READY)
    stalls.look([b], 105.0, READY)  # a ended
    again = Job("a", last_bytes=a.last_bytes)  # an id seen before, as a new job: judged afresh
    assert stalls.look([again, b], 111.0, READY) == [b]


def test_before_its_first_bytes_a_job_whose_model_still_loads_is_not_silent() -> None:
    stalls = Stalls(10.0)
    job = Job("a")
    assert stalls.look([job], 150.0, frozenset()) == []  # loading since 100: nothing counts yet
    assert stalls.look([job], 155.0, READY) == []  # loaded: silent from the look that saw it loading
    assert stalls.look([job], 160.0, READY) == [job]
    mid = Job("b", last_bytes=b"x")  # under way: judged whatever the readings say
    stalls.look([mid], 200.0, frozenset())
    assert stalls.look([mid], 210.0, frozenset()) == [mid]


def test_a_stream_held_back_for_its_slow_reader_is_not_a_stall() -> None:
    """Its agent waits for the requester to take what was sent: Ollama is not being read, so its
    silence says nothing of Ollama; once the reader catches up, the silence counts from then."""
    stalls = Stalls(10.0)
    job = Job("a", last_bytes=b"x", held=True)
    assert stalls.look([job], 101.0, READY) == []
    assert stalls.look([job], 130.0, READY) == []
    job.held = False
    assert stalls.look([job], 135.0, READY) == []
    assert stalls.look([job], 140.0, READY) == [job]
