"""How fast a burst could be served at best: an ideal schedule on the simulators' own rate model,
to read a policy's burst TTFT against.

The schedule is deliberately generous; no router can do better than it on this fleet:

- every server with the model on disk starts loading it the instant the burst arrives, with nothing
  to evict or wait for (what is loaded there already costs nothing to give up);
- a slot takes a waiting request the moment it frees, with no routing, queueing or network time;
- the waiting request it takes is the one with the least work (clairvoyant: it knows each reply's
  length in advance, as no router does), which brings the later first tokens forward;
  ``order="sent"`` takes them first come, first served instead, as a router that does not know the
  replies' lengths must;
- streams on one runner share its speed as the simulator's engine shares it (`share`), at the
  rates and load times of each server's `SimConfig`.

A request's work is its prompt (evaluated `prompt_factor` times faster than decoding) and then its
reply; its first token comes one decoded token after the prompt.

`beside` narrows the servers to those where the model loads whole next to models already loaded
there (the simulator's own memory estimate and Ollama's 80 % rule): the schedule of a router that
never evicts a busy model to make room, which is what a cold burst beside steady traffic asks of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from corral.simulator import SimConfig
from corral.simulator.catalog import Catalog
from corral.simulator.config import GIB
from corral.simulator.engine import share
from corral.simulator.placement import RunnerOptions, estimate, fit

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


Order = Literal["shortest", "sent"]


def beside(sims: Sequence[SimConfig], model: str, loaded: Sequence[str]) -> list[SimConfig]:
    """The simulators where ``model``, at the server's default context, loads wholly in VRAM with
    ``loaded`` (each loaded in turn, as the simulator places them) left where they are."""
    out = []
    for c in sims:
        catalog = Catalog(c)
        want = catalog.get(model)
        if want is None or c.vendor == "cpu":
            continue
        free = [int(g.vram_gb * GIB) - int(c.gpu_overhead_gb * GIB) for g in c.gpus]
        placed = 0
        for name in loaded:
            m = catalog.get(name)
            if m is None:
                continue
            need = estimate(m, RunnerOptions(num_ctx=c.default_num_ctx), c.num_parallel)
            where = fit(need, free, others_loaded=placed > 0, ram_free=0, layers=m.config.layers)
            if where is None:
                break
            for gpu, size in where.per_gpu.items():
                free[gpu] -= size
            placed += 1
        need = estimate(want, RunnerOptions(num_ctx=c.default_num_ctx), c.num_parallel)
        where = fit(need, free, others_loaded=placed > 0, ram_free=0, layers=want.config.layers)
        if where is not None and where.size_vram == where.size:
            out.append(c)
    return out


def first_tokens(
    sims: Sequence[SimConfig], model: str, jobs: Sequence[Job], order: Order = "shortest"
) -> list[float]:
    """Seconds from the burst's start to each job's first token under the ideal schedule, in the
    order of ``jobs``; NaN for every job when no simulator has ``model`` on disk. ``order``: which
    waiting job a freed slot takes, the one with the least work or the one sent first."""
    servers = servers_for(sims, model)
    if not servers:
        return [math.nan] * len(jobs)
    prompt_factor = {c.prompt_factor for c in sims}.pop()

    def work(j: Job) -> tuple[float, float]:  # (seconds to the first token, seconds to the end) at rate 1
        to_first = j.prompt_tokens / prompt_factor + 1
        return to_first, j.prompt_tokens / prompt_factor + j.eval_count

    # pop() takes the least work, equal work in the order sent (or just the order sent)
    by_work = order == "shortest"
    waiting = sorted(range(len(jobs)), key=lambda i: (work(jobs[i])[1] if by_work else 0.0, i))[::-1]
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


def ideal_p95(sims: Sequence[SimConfig], model: str, jobs: Sequence[Job], order: Order = "shortest") -> float:
    """The 95th percentile of `first_tokens`, as the report computes a policy's TTFT p95."""
    return percentile(first_tokens(sims, model, jobs, order), 95)
