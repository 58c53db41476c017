"""How fast a burst could be served at best: an ideal schedule on the simulators' own rate model,
to read a policy's burst TTFT against.

The schedule is deliberately generous; no router can do better than it on this fleet:

- every server with the model on disk starts loading it the instant the burst arrives, with nothing
  to evict or wait for (what is loaded there already costs nothing to give up);
- a slot takes a waiting request the moment it frees, with no routing, queueing or network time;
- the waiting request it takes is the one with the least work (clairvoyant: it knows each reply's
  length in advance, as no router does), which brings the later first tokens forward;
- streams on one runner share its speed as the simulator's engine shares it (`share`), at the
  rates and load times of each server's `SimConfig`.

A request's work is its prompt (evaluated `prompt_factor` times faster than decoding) and then its
reply; its first token comes one decoded token after the prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from corral.simulator import SimConfig
from corral.simulator.engine import share

from bench.common import percentile

EPS = 1e-9


@dataclass(frozen=True)
class Job:
    prompt_tokens: int
    eval_count: int


@dataclass
class _Stream:
    to_first: float  # single-stream decode seconds until the first token (≤ 0 once it came)
    left: float  # single-stream decode seconds until the reply ends
    index: int


@dataclass
class _Server:
    rate: float  # single-stream tokens/s of the model here
    slots: int
    ready_at: float  # simulated seconds from the burst's start until the model is loaded
    streams: list[_Stream] = field(default_factory=list)


def servers_for(sims: Sequence[SimConfig], model: str) -> list[_Server]:
    """One `_Server` per simulator that has ``model`` on disk."""
    out = []
    for c in sims:
        spec = next((m for m in c.models if m.name == model and m.pulled), None)
        if spec is not None:
            out.append(_Server(c.stream_rate(spec.size_gb), c.num_parallel, c.load_seconds(spec.size)))
    return out


def first_tokens(sims: Sequence[SimConfig], model: str, jobs: Sequence[Job]) -> list[float]:
    """Seconds from the burst's start to each job's first token under the ideal schedule, in the
    order of ``jobs``; NaN for every job when no simulator has ``model`` on disk."""
    servers = servers_for(sims, model)
    if not servers:
        return [math.nan] * len(jobs)
    prompt_factor = {c.prompt_factor for c in sims}.pop()

    def work(j: Job) -> tuple[float, float]:  # (seconds to the first token, seconds to the end) at rate 1
        to_first = j.prompt_tokens / prompt_factor + 1
        return to_first, j.prompt_tokens / prompt_factor + j.eval_count

    # pop() takes the least work, equal work in the order sent
    waiting = sorted(range(len(jobs)), key=lambda i: (work(jobs[i])[1], i))[::-1]
    first = [math.nan] * len(jobs)
    now = 0.0
    while True:
        for s in servers:  # fill every free slot of every loaded server
            while s.ready_at <= now + EPS and len(s.streams) < s.slots and waiting:
                i = waiting.pop()
                to_first, total = work(jobs[i])
                s.streams.append(_Stream(to_first / s.rate, total / s.rate, i))
        busy = [s for s in servers if s.streams]
        if not busy and not waiting:
            return first
        # the next event: a server finishes loading, a stream reaches its first token or its end
        step = min((s.ready_at - now for s in servers if s.ready_at > now + EPS), default=math.inf)
        for s in busy:
            speed = share(len(s.streams))
            for st in s.streams:
                nxt = st.to_first if st.to_first > EPS else st.left
                step = min(step, nxt / speed)
        now += step
        for s in busy:
            done = step * share(len(s.streams))
            for st in s.streams:
                if st.to_first > EPS:
                    st.to_first -= done
                    if st.to_first <= EPS:
                        first[st.index] = now
                st.left -= done
            s.streams = [st for st in s.streams if st.left > EPS]


def ideal_p95(sims: Sequence[SimConfig], model: str, jobs: Sequence[Job]) -> float:
    """The 95th percentile of `first_tokens`, as the report computes a policy's TTFT p95."""
    return percentile(first_tokens(sims, model, jobs), 95)
